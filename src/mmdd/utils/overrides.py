"""Hydra refuses `group.key=value` for a key the composed config lacks with its own sentence ("Could not override
'method.grad_klip' ... Key 'grad_klip' is not in struct") and exit code 1, before any mmdd code runs. `unknown_keys`
names the settings such overrides may have meant, as mmdd's own settings check does for `+method.<typo>`."""

from __future__ import annotations

import difflib

# Overrides Hydra itself reads (run directory, launcher, sweeper): not keys of the stage's config.
_HYDRA_PREFIX = "hydra."


def plain_assignment(override: str) -> str | None:
    """The dotted key of a plain `a.b=value` override (no +, ++ or ~; not a group choice like `method=lors`)."""
    if "=" not in override or override[0] in "+~":
        return None
    key = override.split("=", 1)[0].strip()
    if "." not in key or key.startswith(_HYDRA_PREFIX) or "@" in key:
        return None
    return key


def unknown_keys(stage: str, overrides: list[str]) -> list[str]:
    """For each plain `a.b=value` override whose key the stage's composed config lacks: a sentence with the close
    matches among the keys beside it. Composes the stage's config without those overrides (a second or so, and only
    after Hydra refused the command line); [] when that composition fails too (another error, Hydra's is shown)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    from mmdd.paths import conf_dir

    assignments = {o: plain_assignment(o) for o in overrides}
    rest = [o for o, key in assignments.items() if key is None and not o.startswith(_HYDRA_PREFIX)]
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose(stage, overrides=rest)
    except Exception:  # noqa: BLE001 - another problem in the command line: Hydra's own message says it
        return []
    out = []
    for key in (k for k in assignments.values() if k is not None):
        parent, leaf = key.rsplit(".", 1)
        node = OmegaConf.select(cfg, parent, default=None)
        if not isinstance(node, DictConfig) or leaf in node:
            continue
        close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=3)
        hint = f" (did you mean {' or '.join(f'{parent}.{c}' for c in close)}?)" if close else ""
        out.append(f"{key}{hint}: {parent} has no key {leaf!r}; list its keys with `mmdd {stage} --cfg job`, or add a "
                   f"new one with +{key}=...")
    return out
