"""`jlora` command line: `jlora demo`."""

from __future__ import annotations

import argparse
import os
import sys


def _ensure_host_devices(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jlora", description="LoRA for JAX/Flax diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny UNet and LoRA in-process and show load/apply/fuse/save")
    demo.add_argument("--out", default=None, help="directory for the generated and saved LoRA files (default: a temp dir)")
    demo.add_argument("--devices", type=int, default=8, help="host CPU devices to emulate for the sharded step")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _ensure_host_devices(args.devices)
        from jlora.demo import run

        return run(out=args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
