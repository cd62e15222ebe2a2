"""Configuration: YAML presets in `dino/configs/` (or $DINO_CONFIG_DIR), composed with hydra's compose API, with CLI flags on top.

One source of truth: every default lives in a YAML file.  A script declares which flags it accepts and the
config key each flag sets (`Flag`); `ConfigCLI.parse` then

1. composes the preset named by `--config` (or the script's default) with the trailing `key=value`
   overrides (hydra syntax),
2. writes the value of every flag given on the command line into its key,
3. rejects unknown flags and keys with a message naming the nearest valid ones.

`--help` shows each flag's default as read from the YAML, so help and behaviour cannot disagree.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from dino.errors import UserError, suggest


# The presets ship inside the package (dino/configs/<group>/<name>.yaml, read through importlib.resources so a
# wheel finds them).  $DINO_CONFIG_DIR names a folder of the same layout with a user's own presets: a name is
# looked up there first, then among the package's presets.
def package_config_dir() -> Path:
    """The package's preset folder (a real directory in a wheel, an editable install or a checkout)."""
    from importlib.resources import files

    return Path(str(files("dino") / "configs"))


def config_dirs() -> list[Path]:
    """Folders searched for `<group>/<name>.yaml`, in order: $DINO_CONFIG_DIR (when set), then the package's."""
    folders = []
    override = os.environ.get("DINO_CONFIG_DIR")
    if override:
        folder = Path(override).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"DINO_CONFIG_DIR={override!r} is not a folder (it should hold train/, eval/ or inference/)"
            )
        folders.append(folder)
    folders.append(package_config_dir())
    return folders


def find_config(config_name: str) -> Path | None:
    """Path of `<group>/<name>.yaml` in the first folder of `config_dirs()` holding it, else None."""
    for folder in config_dirs():
        path = folder / f"{config_name}.yaml"
        if path.is_file():
            return path
    return None


# `dino.loss_style` is a shorthand: the three switches it stands for follow it (`${loss_style:...}` in the training
# _base.yaml) unless a preset or the command line sets one of them itself.
LOSS_STYLES: dict[str, dict[str, Any]] = {
    "v1": {
        "dino.center_update": "immediate",
        "dino.pair_normalisation": "pair_mean",
        "teacher.temp_per_iteration": False,
    },
    "v2": {"dino.center_update": "deferred", "dino.pair_normalisation": "dinov2", "teacher.temp_per_iteration": True},
}


def _loss_style_value(style: Any, key: str) -> Any:
    if style not in LOSS_STYLES:
        raise ValueError(f"dino.loss_style must be v1 or v2 (or set {key} itself), got {style!r}")
    return LOSS_STYLES[style][key]


OmegaConf.register_new_resolver("loss_style", _loss_style_value, replace=True)

# Keys of older versions, still understood in a stored config (a checkpoint's, a user's preset) and as overrides:
# old key → (new key, value when the old key is true). A false old key leaves the new one as it is.
LEGACY_PRECISION_KEYS: dict[str, tuple[str, str]] = {
    "train.hmp": ("train.precision", "bf16"),
    "train.fp16": ("train.precision", "fp16"),
    "hmp": ("precision", "bf16"),  # the eval presets
}


def upgrade_legacy_keys(cfg: DictConfig) -> DictConfig:
    """Map the keys of older configs onto today's, in place (struct mode is lifted meanwhile).

    `train.hmp` / `train.fp16` (and the eval presets' `hmp`) become `train.precision` (`precision`); a stored
    `dino.loss_style` without the three switches it stands for gets them spelled out (`LOSS_STYLES`).
    """
    from omegaconf import open_dict

    with open_dict(cfg):
        for old, (new, value) in LEGACY_PRECISION_KEYS.items():
            parent_key, _, leaf = old.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if not isinstance(parent, DictConfig) or leaf not in parent:
                continue
            on = parent[leaf]
            del parent[leaf]
            if on is True or OmegaConf.select(cfg, new, default=None) is None:
                OmegaConf.update(cfg, new, value if on is True else "fp32", merge=False)
        style = OmegaConf.select(cfg, "dino.loss_style", default=None)
        if style in LOSS_STYLES:
            for key, value in LOSS_STYLES[style].items():
                if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                    OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _upgrade_override(override: str, valid: Sequence[str]) -> str:
    """`train.hmp=true` → `train.precision=bf16` (and the eval `hmp=`, `train.fp16=`) when the old key is gone."""
    key, _, value = override.partition("=")
    if key in valid or key not in LEGACY_PRECISION_KEYS:
        return override
    new, on_value = LEGACY_PRECISION_KEYS[key]
    try:
        on = bool_flag(value)
    except argparse.ArgumentTypeError:
        raise UserError(f"{key} is now {new} (fp32 | bf16 | fp16); cannot read {override!r}") from None
    return f"{new}={on_value if on else 'fp32'}"


def precision_flags(key: str, fp16: bool = True) -> list["Flag"]:
    """--precision and its aliases --hmp/--use_bf16 (bf16) and --fp16/--use_fp16 (fp16); `--hmp false` means fp32."""

    def alias(on_value: str) -> Callable[[str], str]:
        def parse(value: str) -> str:
            return on_value if bool_flag(value) else "fp32"

        return parse

    bare = dict(nargs="?", const="true", metavar="BOOL")
    flags = [
        Flag(
            ("--precision",),
            key,
            "fp32, bf16 (autocast) or fp16 (autocast with loss scaling, CUDA)",
            choices=("fp32", "bf16", "fp16"),
        ),
        Flag(
            ("--hmp", "--use_bf16"),
            key,
            "alias of --precision bf16 (--hmp false: fp32)",
            type=alias("bf16"),
            extra=bare,
        ),
    ]
    if fp16:
        flags.append(
            Flag(
                ("--fp16", "--use_fp16"),
                key,
                "alias of --precision fp16 (--fp16 false: fp32)",
                type=alias("fp16"),
                extra=bare,
            )
        )
    return flags


def bool_flag(value: str | bool) -> bool:
    """Parse true/false/yes/no/1/0 (the DINO scripts' `--flag True|False` style)."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("true", "t", "yes", "y", "1", "on"):
        return True
    if lowered in ("false", "f", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def list_presets(group: str) -> list[str]:
    """Names of the YAML presets in `<config dir>/<group>/` (files starting with '_' are shared bases)."""
    names = {p.stem for folder in config_dirs() for p in (folder / group).glob("*.yaml")}
    return sorted(name for name in names if not name.startswith("_"))


def flatten_keys(cfg: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a config, leaves and inner nodes, e.g. ['optim', 'optim.lr', ...]."""
    keys: list[str] = []
    if isinstance(cfg, (DictConfig, dict)):
        for key in cfg.keys():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            value = cfg[key] if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=False)[key]
            keys.extend(flatten_keys(value, dotted + "."))
    return keys


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~")


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `<config dir>/<config_name>.yaml` with hydra overrides; unknown keys raise a UserError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    path = find_config(config_name)
    if path is None:
        group = str(Path(config_name).parent)
        available = list_presets(group) if group != "." else []
        raise UserError(
            f"unknown config {Path(config_name).name!r} (looked in {', '.join(str(d / Path(config_name).parent) for d in config_dirs())})."
            + suggest(Path(config_name).name, available)
            + (f" Available: {', '.join(available)}" if available else "")
        )
    # each group folder is its own config root, so a preset's keys sit at the top level; a user's preset can
    # still build on the package's shared bases (`defaults: [_base]`) through hydra's search path
    package_group = package_config_dir() / Path(config_name).parent
    search = [] if path.parent == package_group else [f"hydra.searchpath=[file://{package_group}]"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base=None, config_dir=str(path.parent)):
        base = hydra_compose(config_name=path.stem, overrides=search)
        valid = flatten_keys(base)
        overrides = [_upgrade_override(override, valid) for override in overrides]
        for override in overrides:
            if "=" not in override:
                raise UserError(f"cannot read override {override!r}: expected key=value")
            key = _override_key(override)
            if key not in valid and not override.startswith("+"):
                raise UserError(f"unknown config key {key!r}." + suggest(key, valid))
        try:
            cfg = hydra_compose(config_name=path.stem, overrides=search + list(overrides))
        except Exception as err:  # hydra's own parse errors: show them as one line
            raise UserError(f"bad override: {str(err).splitlines()[0]}") from None
    upgrade_legacy_keys(cfg)  # a user's preset written for an older version
    OmegaConf.set_struct(cfg, True)
    return cfg


def set_key(cfg: DictConfig, key: str, value: Any) -> None:
    """Set a dotted key that must already exist in the config."""
    if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
        raise UserError(f"unknown config key {key!r}." + suggest(key, flatten_keys(cfg)))
    if isinstance(value, tuple):
        value = list(value)
    OmegaConf.update(cfg, key, value, merge=False)


@dataclass
class Flag:
    """A command-line flag that sets one config key.

    names: the option strings, e.g. ('--batch_size_per_device', '--batch_size_per_gpu').
    key: the dotted config key it sets, e.g. 'train.batch_size_per_device'.
    type: a callable converting one string (bool_flag for booleans: `--hmp` alone means True).
    nargs: argparse nargs for list values ('+' or an int).
    """

    names: tuple[str, ...]
    key: str
    help: str
    type: Callable[[str], Any] | None = str
    nargs: str | int | None = None
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    extra: dict = field(default_factory=dict)


class ConfigCLI:
    """argparse front end over a hydra-composed config.

    Args:
        description: shown at the top of --help.
        group: the config folder's sub-folder holding this script's presets (e.g. 'train' or 'eval').
        default_config: the preset used without --config.
        flags: the flags this script accepts.
        epilog: text at the end of --help (examples).
    """

    def __init__(
        self,
        description: str,
        group: str,
        default_config: str,
        flags: Sequence[Flag],
        epilog: str = "",
        extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    ):
        self.group = group
        self.default_config = default_config
        self.flags = list(flags)
        self.description = description
        self.epilog = epilog
        self.extra_arguments = extra_arguments

    def _defaults(self) -> DictConfig | None:
        try:
            return compose(f"{self.group}/{self.default_config}")
        except UserError:
            return None

    def build_parser(self) -> argparse.ArgumentParser:
        defaults = self._defaults()
        parser = argparse.ArgumentParser(
            description=self.description,
            epilog=self.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            argument_default=argparse.SUPPRESS,
        )
        presets = list_presets(self.group)
        parser.add_argument(
            "--config",
            metavar="NAME",
            help=f"preset in dino/configs/{self.group}/ or $DINO_CONFIG_DIR/{self.group}/ (default: {self.default_config}; available: {', '.join(presets)})",
        )
        for flag in self.flags:
            default = OmegaConf.select(defaults, flag.key, default=None) if defaults is not None else None
            if isinstance(default, (ListConfig, DictConfig)):
                default = OmegaConf.to_container(default)
            kwargs: dict[str, Any] = dict(dest=flag.key, help=f"{flag.help} [{flag.key}; default: {default}]")
            if flag.type is bool_flag:
                kwargs.update(type=bool_flag, metavar="BOOL")
            else:
                kwargs.update(type=flag.type)
                if flag.nargs is not None:
                    kwargs["nargs"] = flag.nargs
                if flag.choices is not None:
                    kwargs["choices"] = flag.choices
                if flag.metavar is not None:
                    kwargs["metavar"] = flag.metavar
            kwargs.update(flag.extra)
            parser.add_argument(*flag.names, **kwargs)
        if self.extra_arguments is not None:
            self.extra_arguments(parser)
        parser.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="hydra-style overrides of any config key, applied before the flags (e.g. optim.lr=1e-3)",
        )
        return parser

    def _expand_bare_bool_flags(self, argv: list[str]) -> list[str]:
        """`--hmp` alone means `--hmp true`; `--hmp false` / `--hmp=0` keep their value."""
        # also the aliases taking an optional boolean (`--hmp` → --precision bf16, `--use_cuda`): const "true"
        bool_names = {
            name
            for flag in self.flags
            if flag.type is bool_flag or flag.extra.get("const") == "true"
            for name in flag.names
        }
        expanded: list[str] = []
        for i, token in enumerate(argv):
            expanded.append(token)
            if token in bool_names:
                following = argv[i + 1] if i + 1 < len(argv) else None
                try:
                    bool_flag(following) if following is not None else None
                    if following is None:
                        raise argparse.ArgumentTypeError
                except argparse.ArgumentTypeError:
                    expanded.append("true")
        return expanded

    def parse(self, argv: Sequence[str] | None = None) -> tuple[DictConfig, argparse.Namespace]:
        """Return (config, namespace); the namespace holds the extra (non-config) arguments."""
        parser = self.build_parser()
        argv = self._expand_bare_bool_flags(list(sys.argv[1:] if argv is None else argv))
        known, unknown = parser.parse_known_args(argv)
        for token in unknown:
            if token.startswith("-"):
                valid = [name for action in parser._actions for name in action.option_strings]
                raise UserError(f"unknown flag {token.split('=')[0]!r}." + suggest(token.split("=")[0], valid))
            raise UserError(f"unexpected argument {token!r}")
        overrides = list(getattr(known, "overrides", []) or [])
        config_name = getattr(known, "config", None) or self.default_config
        cfg = compose(f"{self.group}/{config_name}", overrides)
        for flag in self.flags:
            if hasattr(known, flag.key):
                set_key(cfg, flag.key, getattr(known, flag.key))
        return cfg, known


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))
