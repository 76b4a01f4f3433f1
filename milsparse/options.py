"""What a `compress` or `verify` run is asked for, checked once.

`CompressOptions.build` and `VerifyOptions.build` hold every rule about the options of one
command: which steps need calibration samples, what `plot` and `jobs` accept, the samples and
seed of generated inputs, the files given, the output path. `milsparse.compress` and
`milsparse.verify` build one from their keywords; the CLI translates its flags into the same
keywords and builds the same object, so a rule is written once and says the same thing to both
(the CLI's messages name the flags where the two differ only in spelling).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milsparse.errors import ConfigError

__all__ = [
    "CompressOptions",
    "VerifyOptions",
    "Spelling",
    "API",
    "CLI",
    "default_jobs",
    "check_count",
]


@dataclass(frozen=True)
class Spelling:
    """How messages name an option: `samples` for the API, `--samples` for the CLI."""

    option: Any  # name -> how it is written
    calibration_hint: str
    overwrite_flag: str


API = Spelling(
    lambda name: name, "calibration=[{input: array}, ...] or an .npz path", "overwrite=True"
)
CLI = Spelling(lambda name: "--" + name.replace("_", "-"), "--calibration FILE.npz", "--force")


def default_jobs() -> int:
    """Every core this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_count(name: str, value, low: int, spelling: Spelling = API) -> int:
    """`value` as an int >= `low` (bools refused), or ConfigError naming `name`."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{spelling.option(name)} must be an integer >= {low}, got {value!r}")
    return int(value)


def _existing_file(value, what: str):
    """`value` unchanged; a path must name an existing file."""
    from milsparse.ir.samples import is_path

    if is_path(value) and not Path(os.fsdecode(value)).is_file():
        raise ConfigError(f"{os.fsdecode(value)}: no such file ({what})")
    return value


def calibration_use(recipe) -> tuple[tuple[str, str] | None, bool]:
    """(the option that needs calibration samples and its value: ("criterion", "wanda"),
    ("allocate", "budget"), or None; whether any step uses them at all). Prune's data-aware
    criteria and allocation need them; palettize and quantize weight their fits with them."""
    prune = recipe.step("prune")
    needed = None
    if prune is not None and prune.config.criterion != "magnitude":
        needed = ("criterion", prune.config.criterion)
    elif prune is not None and prune.config.allocate != "uniform":
        needed = ("allocate", prune.config.allocate)
    used = needed is not None or any(s.kind in ("palettize", "quantize") for s in recipe.steps)
    return needed, used


@dataclass(frozen=True)
class CompressOptions:
    """A checked compress request (build it with `build`)."""

    model: Any  # the input, opened: an MLModel
    recipe: Any  # milsparse.recipe.Recipe
    target: Any = None  # coremltools AvailableTarget, or None: the model's own
    output: Path | None = None
    overwrite: bool = False
    calibration: Any = None  # samples, or an .npz path
    plot: Path | None = None
    jobs: int = 1
    progress: bool | None = None  # bars: None only on a terminal (milsparse.ir.progress)

    @classmethod
    def build(
        cls,
        model,
        config,
        *,
        target=None,
        output=None,
        overwrite: bool = False,
        calibration=None,
        plot=None,
        jobs: int | None = None,
        progress: bool | None = None,
        spelling: Spelling = API,
    ) -> CompressOptions:
        """Check every option, and the output path, before any work; messages name options
        as `spelling` writes them."""
        from milsparse import package, staging, targets
        from milsparse.recipe import Recipe

        o = spelling.option
        recipe = Recipe.coerce(config)
        jobs = default_jobs() if jobs is None else check_count("jobs", jobs, 1, spelling)
        if progress is not None and not isinstance(progress, bool):
            raise ConfigError(f"{o('progress')} must be True, False or None, got {progress!r}")
        needed, used = calibration_use(recipe)
        if needed and calibration is None:
            raise ConfigError(
                f"{o(needed[0])} {needed[1]} needs calibration inputs: {spelling.calibration_hint}"
            )
        if calibration is not None and not used:
            raise ConfigError(
                f"{o('calibration')} applies with {o('criterion')} wanda or sparsegpt, "
                f"{o('allocate')} global or budget, or a palettize / quantize step (weighted by "
                "activation energy)"
            )
        if calibration is not None:
            _existing_file(calibration, "calibration")
        prune = recipe.step("prune")
        if plot is not None and (prune is None or prune.config.allocate == "uniform"):
            raise ConfigError(f"{o('plot')} draws the curves of {o('allocate')} global or budget")
        target = targets.parse_target(target if target is not None else recipe.target)
        model = package.open_model(model)  # the input's one existence and format check
        source = package.source_path(model)
        if output is not None:
            output = Path(os.fsdecode(output))
            staging.check_output_path(
                output,
                overwrite=overwrite,
                inputs=[source],
                needed_bytes=package.compress_needs(model),
                flag=spelling.overwrite_flag,
            )
        return cls(
            model=model,
            recipe=recipe,
            target=target,
            output=output,
            overwrite=bool(overwrite),
            calibration=calibration,
            plot=None if plot is None else Path(os.fsdecode(plot)),
            jobs=jobs,
            progress=progress,
        )


@dataclass(frozen=True)
class VerifyOptions:
    """A checked verify request: inputs (None: generated), tolerances, the generated inputs'
    count and seed, the function to run."""

    inputs: Any = None
    tolerances: Any = None  # milsparse.metrics.Tolerances
    samples: int = 4
    seed: int = 0
    function: str | None = None

    @classmethod
    def build(
        cls, inputs=None, *, tolerances=None, samples=4, seed=0, function=None, spelling=API
    ) -> VerifyOptions:
        from milsparse.metrics import Tolerances

        if tolerances is None:
            tolerances = Tolerances()
        elif not isinstance(tolerances, Tolerances):
            raise ConfigError(f"tolerances must be a milsparse.Tolerances, got {tolerances!r}")
        if inputs is not None:
            _existing_file(inputs, "inputs")
        if function is not None and not isinstance(function, str):
            raise ConfigError(f"function must be a function name, got {function!r}")
        return cls(
            inputs=inputs,
            tolerances=tolerances,
            samples=check_count("samples", samples, 1, spelling),
            seed=check_count("seed", seed, 0, spelling),
            function=function,
        )

    @staticmethod
    def tolerances_from(min_snr=None, min_cosine=None, max_mismatch=None):
        """Tolerances with the defaults for the bounds not given (the CLI's flags)."""
        from milsparse.metrics import Tolerances

        given = {
            "min_snr_db": min_snr,
            "min_cosine": min_cosine,
            "max_mismatch": max_mismatch,
        }
        return Tolerances(**{k: v for k, v in given.items() if v is not None})
