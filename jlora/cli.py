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


_FAMILIES = ["sd", "sd2", "sdxl", "flux", "flux2", "flux2_klein_4b", "flux2_klein_9b", "z_image", "ltx2"]


def _model_options(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--family", choices=_FAMILIES, default=None,
                   help=f"{verb} against this family's standard models (default: guessed from the file's format and names)")
    p.add_argument("--unet-config", default=None, metavar="PATH",
                   help=f"a diffusers UNet config.json, or a folder holding one, to {verb} against instead")
    p.add_argument("--text-encoder-config", default=None, metavar="PATH",
                   help="a transformers CLIP text config.json, or a folder holding one, for text_encoder")
    p.add_argument("--text-encoder-2-config", default=None, metavar="PATH",
                   help="a transformers CLIP text config.json, or a folder holding one, for text_encoder_2")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin/.pt/.ckpt files with torch.load(weights_only=True); pickles can run code")


class _Version(argparse.Action):
    """`--version`, importing jlora (and jax) only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from jlora import __version__

        print(f"jlora {__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jlora", description="LoRA for JAX/Flax diffusion models.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny UNet and LoRA in-process and show load/apply/fuse/save")
    demo.add_argument("--out", default=None, help="directory for the generated and saved LoRA files (default: a temp dir)")
    demo.add_argument("--devices", type=int, default=8, help="host CPU devices to emulate for the sharded step")

    ins = sub.add_parser("inspect", help="format, family, components, placed counts, ranks, alphas, training metadata, "
                                         "dtypes, size and unplaceable keys")
    ins.add_argument("files", nargs="+", help="LoRA files (.safetensors; .bin/.pt with --allow-pickle), folders or Hub repos")
    _model_options(ins, "check")
    ins.add_argument("--plot", default=None, metavar="OUT.png",
                     help="draw the delta norm of every placed module, grouped by block, as a PNG bar chart "
                          "(with several files: OUT-<file stem>.png)")

    conv = sub.add_parser("convert", help="rewrite LoRA files as diffusers/PEFT files or jlora adapter files")
    conv.add_argument("files", nargs="+", help="LoRA files (.safetensors; .bin/.pt with --allow-pickle), folders or Hub repos")
    _model_options(conv, "convert")
    conv.add_argument("--to", choices=["diffusers", "flax"], required=True,
                      help="diffusers: a diffusers/PEFT .safetensors file; flax: a jlora adapter file (Flax layout)")
    conv.add_argument("-o", "--out", required=True, help="output directory")
    conv.add_argument("--non-strict", action="store_true", help="skip keys that cannot be placed instead of failing")
    conv.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    return parser


def _hint(e: Exception, allow_pickle: bool) -> str:
    from converters.errors import UnsafeFileError

    text = str(e)
    if isinstance(e, UnsafeFileError) and not allow_pickle:
        text = text.replace("pass allow_pickle=True", "pass --allow-pickle")
        if "--allow-pickle" not in text:
            text += " (pass --allow-pickle to read it with torch.load(weights_only=True))"
    return text


def _each(files, fn, allow_pickle: bool = False) -> tuple[list[dict], int]:
    """`fn(path)` for every file; a JloraError, or a result with an `error`, makes exit code 1."""
    from converters.errors import JloraError

    results, code = [], 0
    for path in files:
        try:
            results.append(fn(path))
        except JloraError as e:
            results.append({"file": path, "error": _hint(e, allow_pickle), "error_type": type(e).__name__})
        if "error" in results[-1]:
            code = 1
    return results, code


def _print_json(results: list[dict]) -> None:
    print(json.dumps(results if len(results) > 1 else results[0], indent=2, default=str))


def _overrides(args) -> dict:
    from jlora.inspection import config_indexes

    return config_indexes(args.unet_config, args.text_encoder_config, args.text_encoder_2_config)


def _plot_path(plot: str, path: str, many: bool) -> str:
    if not many:
        return plot
    root, ext = os.path.splitext(plot)
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return f"{root}-{stem}{ext or '.png'}"


def _run_inspect(args) -> int:
    from jlora.inspection import format_inspection, inspect_file

    overrides = _overrides(args)

    def one(path):
        info = inspect_file(path, family=args.family, allow_pickle=args.allow_pickle, overrides=overrides,
                            strengths=bool(args.plot))
        if info.get("strengths"):
            from jlora.plot import plot_strengths

            rows = [(s["component"], s["group"], s["module"], s["norm"]) for s in info["strengths"]]
            info["plot"] = plot_strengths(rows, _plot_path(args.plot, path, len(args.files) > 1))
        return info

    results, code = _each(args.files, one, args.allow_pickle)
    if args.json:
        _print_json(results)
    else:
        for r in results:
            _print(format_inspection(r) if "format" in r else f"{r['file']}\n  error       {r['error']}")
            if r.get("plot"):
                _print(f"  plot        {r['plot']} ({len(r['strengths'])} modules)")
    return code


def _run_convert(args) -> int:
    from tqdm.auto import tqdm

    from converters.errors import JloraError

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise JloraError(f"-o {args.out}: exists and is not a directory; name an output directory.")

    from jlora.inspection import convert_file

    overrides = _overrides(args)
    files = tqdm(args.files, desc="converting", unit="file", disable=args.json or len(args.files) < 2, file=sys.stderr)
    results, code = _each(
        files,
        lambda path: convert_file(path, args.out, family=args.family, to=args.to, strict=not args.non_strict,
                                  allow_pickle=args.allow_pickle, overrides=overrides, overwrite=args.overwrite),
        args.allow_pickle,
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
    """`jlora demo | inspect | convert`; user errors print one `error:` line and exit 2, never a traceback
    (with `--json` also a JSON object with `error` and `error_type` on stdout)."""
    from converters.errors import JloraError, clean_message

    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `jlora inspect ... | head` exits quietly
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (JloraError, OSError, ValueError) as e:
        text = clean_message(_hint(e, getattr(args, "allow_pickle", False))).replace("\n", " ")
        print(f"error: {type(e).__name__}: {text}" if not isinstance(e, JloraError) else f"error: {text}",
              file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": text, "error_type": type(e).__name__}))
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
