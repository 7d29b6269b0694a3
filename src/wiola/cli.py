"""The `wiola` command line: one subcommand per typed function.

Each subcommand is a plain Python function with annotated parameters; this module turns
its signature into an argparse parser (parameters without a default become positional
arguments, the rest `--options`, except `Annotated[..., "positional"]` ones: optional positionals), its docstring into the help text, and runs it.
User errors (`WiolaError`, bad values, missing files, full or read-only disks and other
`OSError`s, and a `--seed` outside 0 .. 2**32 - 1) end in one clear line and exit status 2; `--debug` or `WIOLA_DEBUG=1` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import inspect
import os
import re
import sys
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin

from wiola.errors import WiolaError, check_seed

# subcommand -> "module:function"; modules are imported only when their command runs.
COMMANDS: dict[str, str] = {
    "tokenizer": "wiola.data.tokenizer:tokenizer_command",
    "prepare": "wiola.data.prepare:prepare_command",
    "train": "wiola.train.trainer:train_command",
    "eval": "wiola.evaluate:eval_command",
    "generate": "wiola.generate:generate_command",
    "chat": "wiola.chat:chat_command",
    "convert": "wiola.convert:convert_command",
    "merge": "wiola.finetune:merge_command",
    "presets": "wiola.configuration_wiola:presets_command",
    "bench": "wiola.bench:bench_command",
    "card": "wiola.card:card_command",
    "push": "wiola.publish:push_command",
    "compare": "wiola.compare:compare_command",
    "serve": "wiola.serve:serve_command",
    "export": "wiola.export:export_command",
}


def _load(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _param_docs(doc: str) -> dict[str, str]:
    """Parse a Google-style `Args:` section into {name: description}."""
    docs: dict[str, str] = {}
    match = re.search(r"^\s*Args:\s*$(.*?)(^\s*\w+:\s*$|\Z)", doc, re.M | re.S)
    if not match:
        return docs
    current = None
    for line in match.group(1).splitlines():
        m = re.match(r"^\s{2,}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 8):
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_argument(parser: argparse.ArgumentParser, param: inspect.Parameter, tp: Any, help_text: str) -> None:
    positional = False
    if get_origin(tp) is typing.Annotated:  # Annotated[str | None, "positional"]: an optional positional argument
        positional = "positional" in tp.__metadata__
        tp = get_args(tp)[0]
    tp = _unwrap_optional(tp)
    name = param.name
    flag = "--" + name.replace("_", "-")
    has_default = param.default is not inspect.Parameter.empty
    kwargs: dict[str, Any] = {"help": help_text or None}
    if positional:
        parser.add_argument(name, nargs="?", default=param.default, type=tp, **kwargs)
        return
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default if has_default else False, **kwargs)
        return
    if get_origin(tp) is Literal:
        kwargs["choices"] = list(get_args(tp))
        kwargs["type"] = type(kwargs["choices"][0])
    elif get_origin(tp) in (list, tuple):
        (inner,) = get_args(tp)[:1] or (str,)
        kwargs["nargs"] = "+"
        kwargs["type"] = _unwrap_optional(inner)
        if has_default:  # repeated options accumulate: --set a=1 --set b=2
            kwargs["action"] = "extend"
    elif tp in (int, float, str):
        kwargs["type"] = tp
    if has_default:
        if kwargs.get("help") and param.default is not None:
            kwargs["help"] += f" (default: {param.default})"
        parser.add_argument(flag, dest=name, default=param.default, **kwargs)
    else:
        parser.add_argument(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wiola", description="Wiola small language models: data, training, evaluation, generation.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, target in COMMANDS.items():
        # Help for every command needs its signature; import lazily but tolerate missing modules.
        try:
            fn = _load(target)
        except (ImportError, AttributeError):
            continue
        doc = inspect.getdoc(fn) or ""
        summary = doc.split("\n\n")[0].strip()
        description = doc.split("Args:")[0].strip()
        p = sub.add_parser(command, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        hints = typing.get_type_hints(fn, include_extras=True)
        pdocs = _param_docs(doc)
        for param in inspect.signature(fn).parameters.values():
            _add_argument(p, param, hints.get(param.name, str), pdocs.get(param.name, ""))
        p.set_defaults(_fn=fn)
    return parser


def one_line(exc: BaseException) -> str:
    """The message of an error as one line; disk and file-system errors say what happened where."""
    if isinstance(exc, OSError) and not isinstance(exc, WiolaError) and exc.errno is not None:
        where = f": {exc.filename}" if exc.filename else ""
        reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EPIPE: "broken pipe (a worker process ended)"}
        text = f"{reasons.get(exc.errno, exc.strerror or str(exc))}{where}"
    else:
        text = str(exc) or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    debug = args.debug or os.environ.get("WIOLA_DEBUG") == "1"
    fn = args._fn
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "_fn")}
    try:
        if kwargs.get("seed") is not None:  # every --seed: numpy, transformers and torch all take it
            check_seed(kwargs["seed"])
        result = fn(**kwargs)
    except KeyboardInterrupt:
        print("wiola: interrupted", file=sys.stderr)
        return 130
    except (WiolaError, ValueError, OSError) as exc:
        if debug:
            raise
        print(f"wiola {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
