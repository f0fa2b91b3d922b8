"""``python train.py --help``: what to type, and every config group with its options.

The options are read from the config folders' file names, without composing anything: Hydra's own
help composes the config once per config group, twice over (about 2 s of the 2.8 s the command took).
Hydra's help is still there with overrides (``python train.py model=x --help``), and its own flags
with ``--hydra-help``.
"""

from __future__ import annotations

from pathlib import Path

HELP = ("-h", "--help")
CONFIG_DIR = ("-cd", "--config-dir")

USAGE = """\
python train.py [group=option ...] [key=value ...]      train a CIFAR classifier

  python train.py model=simple_cnn trainer.max_epochs=5   pick options, change any value
  python train.py experiment=speedrun                      a whole recipe
  python train.py -m optimizer=sgd,adam                    a sweep (one job per combination)
  python train.py model=simple_cnn --cfg job               print the composed config, run nothing
  python train.py --hydra-help                             Hydra's own flags

Config groups (group=option), from {roots}:
{groups}

Every key and what it does: README.md ("Configuration") and the comments in each YAML file.
"""


def help_config_dirs(argv: list[str], conf: Path) -> list[Path] | None:
    """The config folders to list when ``argv`` asks for help and nothing else (``--config-dir DIR`` adds its
    folder), else None: Hydra answers."""
    roots, rest, asked = [conf], list(argv), False
    while rest:
        word = rest.pop(0)
        name, eq, value = word.partition("=")
        if word in HELP:
            asked = True
        elif name in CONFIG_DIR and (eq or rest):
            roots.append(Path(value if eq else rest.pop(0)))
        else:
            return None
    return roots if asked else None


def config_groups(roots: list[Path]) -> dict[str, list[str]]:
    """Every config group below ``roots`` (Hydra's own, ``hydra/``, left out) -> its options, sorted."""
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in root.rglob("*.yaml"):
            group = path.parent.relative_to(root).as_posix()
            if group != "." and group.split("/")[0] != "hydra":
                found.setdefault(group, set()).add(path.stem)
    return {group: sorted(options) for group, options in sorted(found.items())}


def help_text(roots: list[Path]) -> str:
    groups = "\n".join(f"  {group}: {', '.join(options)}" for group, options in config_groups(roots).items())
    return USAGE.format(roots=", ".join(str(r) for r in roots), groups=groups)
