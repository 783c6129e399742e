"""cli.py: the scripts' command line: each script's @dataclass Config becomes its argparse flags, and a user's
mistake becomes one `error: ...` line and exit status 2. Also the checks and the atomic writes every script shares."""

import argparse
import ast
import dataclasses
import inspect
import io
import operator
import os
import shutil
import sys
import textwrap
import tokenize
import typing


class UserError(ValueError):
    """A mistake in a flag, file, record or checkpoint, not a bug: a script prints it as one line and exits 2."""


class UserFileError(UserError, FileNotFoundError):
    """A UserError about a file or folder (missing, unwritable), still caught as the OSError it is."""


class UserKeyError(UserError, KeyError):
    """A UserError about a checkpoint's tensor names, still caught as the KeyError it is."""


def require(cond, msg, error=UserError):
    """Raises `error(msg)` unless `cond`: a check of user input in one line."""
    if not cond:
        raise error(msg)


def atomic_write(path, write):
    """Writes `path` all or nothing: `write(tmp)` fills a temporary path beside it (a file, or a folder that then
    replaces a whole folder), which is renamed into place; a failed write leaves `path` as it was and removes the
    temporary. `write` may also be the bytes or text to write. A kill between a folder's two renames leaves the old
    one as path.old<pid> (hub.recover_checkpoint moves it back)."""
    tmp = f"{path}.tmp{os.getpid()}"  # runs side by side may write the same path
    remove_path(tmp)  # a leftover of a killed run with our pid
    if isinstance(write, (bytes, str)):
        content = write

        def write(p):
            with open(p, "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)

    try:
        write(tmp)
    except BaseException:
        remove_path(tmp)
        raise
    if not os.path.isdir(tmp) or not os.path.exists(path):
        os.replace(tmp, path)
        return
    old = f"{path}.old{os.getpid()}"  # a folder cannot replace a folder in one rename
    os.replace(path, old)
    os.replace(tmp, path)
    remove_path(old)


def remove_path(path):
    """Removes a file or a folder, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def run_main(main):
    """Every script's __main__: a UserError is one `error: ...` line (rank 0) and exit status 2.
    Anything else is a bug and keeps its traceback; `main(argv)` itself still raises, for tests."""
    try:
        main()
    except UserError as e:
        msg = str(e.args[0] if e.args else e)
        # raised in a DataLoader worker, it arrives inside the worker's traceback, whose last line is
        # the original `module.Class: message`
        if msg.startswith("Caught ") and "Original Traceback" in msg:
            msg = msg.rstrip().splitlines()[-1].split(": ", 1)[-1]
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


DTYPES = ("float32", "bfloat16", "float16")  # --dtype's choices


def parse_bool(s):
    """A yes/no flag's value: a typo (`--resume ture`) is an error, never a silent false."""
    v = s.lower()
    if v not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"{s!r} is not a yes/no value (true/false, 1/0, yes/no)")
    return v in ("1", "true", "yes")


def field_comments(cls):
    """{field: its trailing `# comment`}, from the class's source: each flag's help. A comment-only
    line aligned under a field's comment continues it; one at the fields' own indent does not."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments, code = {}, set()  # row -> (column, text); rows holding code
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code.update(range(tok.start[0], tok.end[0] + 1))
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.end_lineno
        if row not in comments:
            continue
        text = [comments[row][1]]
        while (
            row + 1 in comments and row + 1 not in code and comments[row + 1][0] > node.col_offset
        ):
            row += 1
            text.append(comments[row][1])
        out[node.target.id] = " ".join(text)
    return out


def field_choices(cls):
    """{field: its allowed values}, for the fields annotated `typing.Literal[...]`."""
    hints = typing.get_type_hints(cls)
    return {
        k: typing.get_args(t) for k, t in hints.items() if typing.get_origin(t) is typing.Literal
    }


def check_config(cfg):
    """UserError naming the flag unless every value in the Config's BOUNDS holds, e.g.
    `BOUNDS = dict(batch_size=">= 1", rho=">= 0, <= 1")`."""
    ops = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
    for name, bound in getattr(cfg, "BOUNDS", {}).items():
        value = getattr(cfg, name)
        for cond in bound.split(","):
            op, limit = cond.split()
            require(ops[op](value, float(limit)), f"--{name} {value}: must be {bound}")
    return cfg


def arg_parser(**kw):
    """An ArgumentParser whose errors raise UserError (main(argv) raises; run_main prints one line).
    Abbreviations are off: `--lr` must never silently mean another flag that starts alike."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError(f"{message} (see --help)")

    return Parser(formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, **kw)


def flag_parser(cls, doc=None):
    """argparse for a dataclass: `--name value` (or `--name=value`) per field, helped by its comment,
    default, choices and bounds; only the flags given land in the namespace, and errors raise."""
    ap = arg_parser(description=doc, argument_default=argparse.SUPPRESS)
    comments, choices, bounds = field_comments(cls), field_choices(cls), getattr(cls, "BOUNDS", {})
    for f in dataclasses.fields(cls):
        kind = type(f.default)
        default = repr(f.default) if f.default == "" else f.default
        notes = [f"default: {default}"] + ([bounds[f.name]] if f.name in bounds else [])
        help = (comments.get(f.name, "") + f" ({'; '.join(notes)})").strip().replace("%", "%%")
        opts = (
            dict(choices=choices[f.name])
            if f.name in choices
            else dict(metavar=kind.__name__.upper())
        )
        ap.add_argument(f"--{f.name}", type=parse_bool if kind is bool else kind, help=help, **opts)
    return ap


def flags_from_argv(cls, argv=None, doc=None):
    """{name: value} of the flags given on the command line (`argv`, else sys.argv)."""
    return vars(flag_parser(cls, doc).parse_args(argv))


def config_from_argv(cls, argv=None, doc=None):
    """argparse generated from a dataclass: each field is `--name value` (or `--name=value`) with its
    default; choices and bounds are checked here, before anything loads."""
    return check_config(cls(**flags_from_argv(cls, argv, doc)))


def non_defaults(cfg):
    """The settings of a run that differ from its script's defaults (what a run prints)."""
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != f.default
    }
