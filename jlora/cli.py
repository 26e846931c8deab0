"""`jlora` command line: `demo`, `inspect`, `convert`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def _ensure_host_devices(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jlora", description="LoRA for JAX/Flax diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny UNet and LoRA in-process and show load/apply/fuse/save")
    demo.add_argument("--out", default=None, help="directory for the generated and saved LoRA files (default: a temp dir)")
    demo.add_argument("--devices", type=int, default=8, help="host CPU devices to emulate for the sharded step")

    families = ["sd", "sd2", "sdxl", "flux"]
    ins = sub.add_parser("inspect", help="format, components, targets, ranks, alphas, dtypes, size and unplaceable keys")
    ins.add_argument("files", nargs="+")
    ins.add_argument("--family", choices=families, default=None, help="check against this family (default: guessed)")
    ins.add_argument("--unet-config", default=None, help="a diffusers UNet config.json to check against instead")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt with torch.load(weights_only=True)")

    conv = sub.add_parser("convert", help="rewrite LoRA files as diffusers/PEFT files or jlora adapter files")
    conv.add_argument("files", nargs="+")
    conv.add_argument("--family", choices=families, default=None)
    conv.add_argument("--unet-config", default=None, help="a diffusers UNet config.json to convert against")
    conv.add_argument("--to", choices=["diffusers", "flax"], required=True)
    conv.add_argument("-o", "--out", required=True, help="output directory")
    conv.add_argument("--non-strict", action="store_true", help="skip keys that cannot be placed instead of failing")
    conv.add_argument("--json", action="store_true", help="machine-readable output")
    conv.add_argument("--allow-pickle", action="store_true")
    return parser


def _each(files, fn) -> tuple[list[dict], int]:
    """`fn(path)` for every file; a JloraError becomes that file's result and exit code 1."""
    from converters.errors import JloraError

    results, code = [], 0
    for path in files:
        try:
            results.append(fn(path))
        except JloraError as e:
            results.append({"file": path, "error": str(e), "error_type": type(e).__name__})
            code = 1
    return results, code


def _print_json(results: list[dict]) -> None:
    print(json.dumps(results if len(results) > 1 else results[0], indent=2, default=str))


def _run_inspect(args) -> int:
    from jlora.inspection import format_inspection, indexes_from_configs, inspect_file

    indexes = indexes_from_configs(args.family, args.unet_config)
    results, code = _each(
        args.files, lambda path: inspect_file(path, family=args.family, allow_pickle=args.allow_pickle, indexes=indexes)
    )
    if args.json:
        _print_json(results)
    else:
        for r in results:
            _print(format_inspection(r) if "format" in r else f"{r['file']}\n  error       {r['error']}")
    return code


def _run_convert(args) -> int:
    from tqdm.auto import tqdm

    from converters.errors import JloraError

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise JloraError(f"-o {args.out}: exists and is not a directory; name an output directory.")

    from jlora.inspection import convert_file, indexes_from_configs

    indexes = indexes_from_configs(args.family, args.unet_config)
    files = tqdm(args.files, desc="converting", unit="file", disable=args.json or len(args.files) < 2, file=sys.stderr)
    results, code = _each(
        files,
        lambda path: convert_file(path, args.out, family=args.family, to=args.to, strict=not args.non_strict,
                                  allow_pickle=args.allow_pickle, indexes=indexes),
    )
    if args.json:
        _print_json(results)
    else:
        for r in results:
            if "error" in r:
                _print(f"{r['file']}: FAILED: {r['error']}", file=sys.stderr)
            else:
                _print(f"{r['file']} ({r['format']}, {r['family']}) -> {r['output']}: {r['targets']} weights")
    return code


def _print(*parts, file=None) -> None:
    """print, with the control characters of file-supplied text (key names) escaped."""
    from converters.errors import escape_control

    print(*(escape_control(str(p)) for p in parts), file=file or sys.stdout)


def main(argv: list[str] | None = None) -> int:
    """`jlora demo | inspect | convert`; user errors print one `error:` line and exit 2, never a traceback."""
    from converters.errors import JloraError, clean_message

    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `jlora inspect ... | head` exits quietly
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (JloraError, OSError, ValueError) as e:
        text = clean_message(str(e)).replace("\n", " ")
        print(f"error: {type(e).__name__}: {text}" if not isinstance(e, JloraError) else f"error: {text}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "demo":
        _ensure_host_devices(args.devices)
        from jlora.demo import run

        return run(out=args.out)
    if args.command == "inspect":
        return _run_inspect(args)
    if args.command == "convert":
        return _run_convert(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
