"""The API contract, checked by buf (`make proto-check`, which `make lint` runs).

    python tools/check_proto.py --buf build/buf/node_modules/.bin/buf [--write-baseline]

1. `buf lint`: buf's STANDARD rules (buf.yaml says which one is left out, and why).
2. `buf breaking` (FILE rules: a change may only add) against
   - the committed baseline image `proto/baseline.txtpb`: every clone has it, also one that
     holds nothing but the checked-out commit;
   - the proto of earlier commits, wherever this clone has them: HEAD (edits not committed yet),
     HEAD~1 (the last commit: on main after a merge, the whole merged branch) and the merge base
     with `main` or `origin/main` (every commit of a feature branch). A commit the clone lacks is
     reported as skipped.

`--write-baseline` (`make proto-baseline`) records the current proto as the baseline once the same
checks pass, so that a baseline never takes in a breaking change. Record it whenever the proto
grows: the baseline is what a clone without history is checked against.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "proto"
BASELINE = ROOT / PROTO_DIR / "baseline.txtpb"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--buf", required=True, help="the buf executable")
    parser.add_argument("--write-baseline", action="store_true")
    args = parser.parse_args()
    buf = str(Path(args.buf).resolve())

    failed = not _run("buf lint", [buf, "lint"])
    if BASELINE.exists():
        against = BASELINE.relative_to(ROOT).as_posix()
        failed |= not _run(
            f"buf breaking against {against}", [buf, "breaking", "--against", against]
        )
    else:
        print(f"buf breaking against {BASELINE.name}: none committed (make proto-baseline)")
    with tempfile.TemporaryDirectory() as scratch:
        for name, commit in _earlier_commits():
            directory = _proto_at(commit, Path(scratch) / commit)
            if directory is None:
                print(
                    f"buf breaking against {name}: skipped ({PROTO_DIR}/ is not in {commit[:12]})"
                )
                continue
            label = f"buf breaking against {name} ({commit[:12]})"
            failed |= not _run(label, [buf, "breaking", "--against", str(directory)])
        if failed:
            return 1
        current = Path(scratch) / BASELINE.name
        if not _run("buf build", [buf, "build", "--exclude-source-info", "-o", str(current)]):
            return 1
        if args.write_baseline:
            BASELINE.write_bytes(current.read_bytes())
            print(f"recorded {BASELINE.relative_to(ROOT)}")
        elif not BASELINE.exists() or BASELINE.read_bytes() != current.read_bytes():
            print(
                f"note: {BASELINE.relative_to(ROOT)} lacks what the proto added since: record it "
                "(make proto-baseline) and commit it with the proto"
            )
    return 0


def _run(label: str, command: list[str]) -> bool:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    print(f"{label}: {'ok' if done.returncode == 0 else 'FAILED'}")
    for line in (done.stdout + done.stderr).splitlines():
        print(f"  {line}")
    return done.returncode == 0


def _git(*args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _earlier_commits() -> list[tuple[str, str]]:
    """(name, commit) of HEAD, HEAD~1 and the merge bases with main, each commit once; those the
    clone lacks (no git, a shallow clone, no main branch) are reported and left out."""
    if _git("rev-parse", "--is-inside-work-tree") != "true":
        print("buf breaking against earlier commits: skipped (not a git work tree)")
        return []
    candidates = [
        ("HEAD", _git("rev-parse", "--verify", "-q", "HEAD^{commit}")),
        ("HEAD~1", _git("rev-parse", "--verify", "-q", "HEAD~1^{commit}")),
        (
            "the merge base with main",
            _git("merge-base", "HEAD", "refs/heads/main")
            or _git("merge-base", "HEAD", "refs/remotes/origin/main"),
        ),
    ]
    found: list[tuple[str, str]] = []
    for name, commit in candidates:
        if not commit:
            print(f"buf breaking against {name}: skipped (not in this clone)")
        elif commit not in (c for _, c in found):
            found.append((name, commit))
    return found


def _proto_at(commit: str, into: Path) -> Path | None:
    """The .proto files of `commit`'s proto directory, written under `into` (None: it had none)."""
    names = _git("ls-tree", "-r", "--name-only", commit, "--", f"{PROTO_DIR}/")
    protos = [name for name in (names or "").splitlines() if name.endswith(".proto")]
    if not protos:
        return None
    for name in protos:
        text = _git("show", f"{commit}:{name}")
        assert text is not None, name
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n", encoding="utf-8")
    return into / PROTO_DIR


if __name__ == "__main__":
    sys.exit(main())
