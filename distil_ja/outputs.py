"""The one deletion rule: what `--force` and `--overwrite` may delete, for every command.

A command that creates an output folder writes MARKER into it first (`claim`). Later, asked to
replace that output (`--force`, `--overwrite`), a command empties a folder only when

- it holds MARKER (this toolkit wrote it), or it is empty; and
- it is none of the protected folders, nor a folder above one of them: the filesystem root, the
  home folder, the current folder, this toolkit's checkout and any git repository around the
  current folder (checked on the real path, so a symlink to one of them is refused too).

Everything else is refused in one line (UsageError, exit 2) that says what is there, before
anything is deleted. Emptying keeps the folder itself (it may be a mount point, a symlink's target
or the current folder of another shell), so `--dump_path .` can never remove the folder it names.
"""

import json
import os
import shutil
from pathlib import Path

from distil_ja.cli import UsageError

MARKER = ".distil-ja-output"
LEGACY_MARKERS = (".distil-ja-demo",)  # run_distill.sh --demo wrote this before the rule was shared
REPO = Path(__file__).resolve().parents[1]  # this toolkit's checkout


def protected_folders() -> dict[Path, str]:
    """Real paths that no command deletes, nor any folder above them, with the name a message uses."""
    cwd = Path.cwd().resolve()
    found = {Path("/"): "the filesystem root", cwd: "the current folder", REPO: "this toolkit's repository"}
    for home in {Path.home(), Path(os.environ.get("HOME") or Path.home())}:
        found[home.resolve()] = "your home folder"
    for folder in (cwd, *cwd.parents):  # the git repository the command runs in, if any
        if (folder / ".git").exists():
            found.setdefault(folder, "a git repository")
            break
    return found


def is_marked(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (MARKER, *LEGACY_MARKERS))


def entries(folder: Path) -> list[str]:
    """What the folder holds, the marker aside, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, *LEGACY_MARKERS))


def describe(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown}{', ...' if len(names) > limit else ''})"


def check_folder(path, what: str = "output folder") -> None:
    """`path` is absent or a folder: anything else (a file, a dangling link) is one line, exit 2."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} exists and is not a folder")
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{what} {path} is a symbolic link to nothing ({os.readlink(path)})")


def check_protected(path) -> None:
    """Refuse a folder that is, or lies above, a protected one (see the module docstring)."""
    real = Path(path).resolve()
    for folder, name in protected_folders().items():
        if real == folder or real in folder.parents:
            where = "is" if real == folder else "is a folder above"
            raise UsageError(f"{path} {where} {name} ({folder}): no command deletes it; nothing was deleted")


def will_replace(path, replace: bool, flag: str, what: str = "output folder") -> bool:
    """Check, before anything is written, that `path` may receive a new output.

    Returns True when it holds an earlier output that `empty` will delete (only with `replace`,
    i.e. the command's --force/--overwrite). Raises UsageError, changing nothing, for a path that
    is not a folder, a non-empty folder without `replace`, and a folder the rule protects.
    """
    path = Path(path)
    check_folder(path, what)
    if not path.exists():
        return False
    held = entries(path)
    if not held:
        return False
    if not replace:
        hint = f"pass {flag} to replace it" if is_marked(path) else \
            f"it was not written by this toolkit, so {flag} would not delete it either: choose a new or empty folder"
        raise UsageError(f"{what} {path} is not empty ({describe(held)}); {hint}")
    check_protected(path)
    if not is_marked(path):
        raise UsageError(f"{what} {path} holds {describe(held)} and no {MARKER}: this toolkit did not write it, "
                         f"so {flag} does not delete it; nothing was deleted: delete it yourself or choose another "
                         "folder")
    return True


def empty(path) -> None:
    """Delete what `path` holds (checked by will_replace first), keeping the folder and its marker."""
    path = Path(path)
    check_protected(path)
    if not is_marked(path) and entries(path):
        raise UsageError(f"{path} holds no {MARKER}: not deleted")
    for entry in path.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def claim(path, command: str, adopt: bool = False) -> Path:
    """Create `path` (parents too) and mark it as `command`'s output, if it is new or empty.

    A folder that already holds something unmarked stays unmarked (a user's folder that a command
    only adds files to never becomes deletable), unless `adopt`: the caller knows the folder is an
    output of this toolkit from before markers existed (train.py resuming a run). A mark is kept.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not is_marked(path) and (adopt or not entries(path)):  # the same bytes every time: outputs compare equal
        (path / MARKER).write_text(json.dumps({"written_by": command}) + "\n")
    return path


def main(argv=None) -> int:
    """`python -m distil_ja.outputs PATH [--replace] [--empty] [--claim COMMAND]`: the rule for a shell script
    (run_distill.sh --demo). Checks PATH as will_replace does (exit 2 and one line when refused), then with
    --empty deletes what an earlier output left there, and with --claim creates and marks it. Prints
    "replace" when PATH held an earlier output, else "new"."""
    from distil_ja.cli import ArgumentParser, run_command

    def run(args):
        parser = ArgumentParser(prog="python -m distil_ja.outputs", description=main.__doc__)
        parser.add_argument("path")
        parser.add_argument("--flag", default="--force", help="the option that replaces, for the messages")
        parser.add_argument("--what", default="output folder")
        parser.add_argument("--replace", action="store_true", help="an earlier output may be replaced")
        parser.add_argument("--empty", action="store_true", help="delete what an earlier output left in PATH")
        parser.add_argument("--claim", metavar="COMMAND", help="create and mark PATH as COMMAND's output")
        args = parser.parse_args(args)
        replaces = will_replace(args.path, args.replace, args.flag, args.what)
        if replaces and args.empty:
            empty(args.path)
        if args.claim:
            claim(args.path, args.claim)
        print("replace" if replaces else "new")

    return run_command(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
