"""Coverage-guided fuzzing of the fuzz targets with atheris (libFuzzer), where atheris is installed.

Each target is one of this directory's Hypothesis tests, driven through its `fuzz_one_input`: libFuzzer's
bytes choose the examples and its coverage of smime/, cps/, directory_sync/ and gateway/ steers them. A
failing input is written under -artifact_prefix and the exception printed; it becomes an @example.

    python -m tests.fuzz.atheris_run --list
    python -m tests.fuzz.atheris_run cms -max_total_time=60 -artifact_prefix=var/fuzz/
"""

from __future__ import annotations

import importlib
import sys

TARGETS = {
    "cms": "tests.fuzz.test_fuzz_smime:test_cms_structures",
    "open-message": "tests.fuzz.test_fuzz_smime:test_open_message",
    "mime-scan": "tests.fuzz.test_fuzz_smime:test_structure_scan_sees_at_least_what_the_email_package_builds",
    "extract": "tests.fuzz.test_fuzz_directory:test_extract_files",
    "extract-zip": "tests.fuzz.test_fuzz_directory:test_extract_archives",
    "trust-space": "tests.fuzz.test_fuzz_directory:test_trust_space_list",
    "card-sdo": "tests.fuzz.test_fuzz_cps:test_pin_tries_from_any_sdo",
    "card-response": "tests.fuzz.test_fuzz_cps:test_response_decoder",
    "address": "tests.fuzz.test_fuzz_smtp:test_envelope_address",
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        print("\n".join(TARGETS) if argv[1:2] == ["--list"] else f"usage: {argv[0]} TARGET [libFuzzer options]",
              file=sys.stdout if argv[1:2] == ["--list"] else sys.stderr)
        return 0 if argv[1:2] == ["--list"] else 2
    import atheris

    import tests.fuzz.conftest  # noqa: F401 (registers the Hypothesis profiles the targets use)

    module, name = TARGETS[argv[1]].split(":")
    with atheris.instrument_imports(include=["smime", "cps", "directory_sync", "gateway"]):
        test = getattr(importlib.import_module(module), name)
    options = argv[2:] if any(o.startswith("-max_len=") for o in argv[2:]) else [*argv[2:], "-max_len=65536"]
    atheris.Setup([argv[0], *options], test.hypothesis.fuzz_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
