"""Run coremltools' weight-compression tests through the `ct_dropin` plugin and read what
happened to each test.

    python tests/conformance/outcomes.py [--baseline] [--out FILE.json]

prints `passed / failed / skipped` counts and writes each test's outcome (JSON) to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = (
    "TestPruneWeights",
    "TestJointCompressWeights",
    "TestPalettizeWeights",
    "TestLinearQuantizeWeights",
    "TestDecompressWeights",
    "TestErrorHandling",
    "TestCoreMLWeightMetaData",
)


def test_file() -> Path:
    """coremltools' own tests of `ct.optimize.coreml`, installed with it."""
    import importlib.util

    spec = importlib.util.find_spec("coremltools")
    root = Path(spec.origin).parent
    return root / "test" / "optimize" / "coreml" / "test_post_training_quantization.py"


def run(baseline: bool = False, workdir: Path | None = None) -> dict[str, str]:
    """{test id: "passed" | "failed" | "skipped" | "xfailed" | "xpassed"} of one run, in a fresh
    process (coremltools' module globals are swapped there, not here)."""
    with tempfile.TemporaryDirectory(prefix="milsparse-conformance-") as tmp:
        workdir = Path(workdir or tmp)
        xml = workdir / "junit.xml"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
        command = [
            sys.executable, "-m", "pytest", str(test_file()), "-p", "ct_dropin",
            "-k", " or ".join(CLASSES), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
            "--rootdir", str(workdir), f"--junitxml={xml}",
            *(["--ct-baseline"] if baseline else []),
        ]  # fmt: skip
        proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
        if not xml.exists():
            raise RuntimeError(f"coremltools' tests did not run:\n{proc.stdout}\n{proc.stderr}")
        return read_junit(xml)


def read_junit(xml: Path) -> dict[str, str]:
    outcomes = {}
    for case in ET.parse(xml).iter("testcase"):
        test_id = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            outcome = "failed"
        elif "skipped" in kinds:
            skipped = kinds["skipped"]
            outcome = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        else:
            outcome = "passed"
        outcomes[test_id] = outcome
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="coremltools' own functions")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    outcomes = run(args.baseline)
    counts = {k: sum(v == k for v in outcomes.values()) for k in sorted(set(outcomes.values()))}
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(outcomes, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
