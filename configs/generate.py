"""Regenerate every JSON config in this folder from pyvarinf2.experiments (single source of
truth); tests/test_cli.py checks the files are up to date.

    python configs/generate.py            # rewrite the files
    python configs/generate.py --check    # exit 1 if any file differs
"""
import json
import pathlib
import sys

from pyvarinf2.data import IMAGE_DATASETS, UCI_DATASETS
from pyvarinf2.experiments import (METHODS, QUICKSTART_CONFIG, classification_config,
                                   quickstart_config, uci_config)

HERE = pathlib.Path(__file__).resolve().parent


def expected_files():
    files = {}
    for method in METHODS:
        for dataset in UCI_DATASETS:
            files[f"regression/{method}_{dataset}.json"] = uci_config(dataset, method)
        for dataset in IMAGE_DATASETS:
            files[f"classification/{method}_{dataset}.json"] = classification_config(dataset,
                                                                                      method)
        files[f"quickstart/{method}_embedded.json"] = quickstart_config(method)
    return {name: json.dumps(cfg, indent=2) + "\n" for name, cfg in files.items()}


def main(argv):
    check = "--check" in argv
    files = expected_files()
    shipped = json.dumps(quickstart_config("bbb"), indent=2) + "\n"
    targets = {HERE / name: text for name, text in files.items()}
    targets[QUICKSTART_CONFIG] = shipped
    stale = []
    for path, text in targets.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    if check and stale:
        print("out of date: " + ", ".join(str(p) for p in stale))
        return 1
    print(f"{len(targets)} configs {'checked' if check else 'written'}"
          f"{'' if check else f' ({len(stale)} changed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
