"""The pipeline spec: loading, path resolution, and validation errors that name file, field, reason."""

import json
from pathlib import Path

import pytest

from corpusforge.spec import PipelineSpec, SpecError, load_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["scifact", "demo"])
def test_committed_specs_are_valid(name):
    spec = load_spec(ROOT / "pipelines" / f"{name}.yaml")
    assert spec.name == name
    assert Path(spec.source_uri).is_absolute()


def test_scifact_spec_reads_shared_data():
    spec = load_spec(ROOT / "pipelines" / "scifact.yaml")
    assert spec.source_uri == str((ROOT.parent / "shared" / "data" / "scifact").resolve())
    assert spec.chunk.max_tokens == 256


def test_relative_paths_resolve_from_the_spec_file(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "x.yaml"
    path.write_text("name: x\nsource: {format: jsonl, path: ../data/x.jsonl}\n")
    monkeypatch.chdir("/")
    assert load_spec(path).source_uri == str(tmp_path / "data" / "x.jsonl")


def test_uris_pass_through(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nsource: {format: parquet, path: 's3://bucket/corpus/'}\n")
    assert load_spec(path).source_uri == "s3://bucket/corpus/"


def _errors(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value), info.value


def test_unknown_field_names_file_field_and_reason(tmp_path):
    msg, err = _errors(tmp_path, "name: x\nsource: {format: beir, path: d}\nchunk: {max_tokenz: 100}\n")
    assert str(tmp_path / "bad.yaml") in msg
    assert ("chunk.max_tokenz", "unknown field (check the spelling)") in err.problems


def test_wrong_type_names_the_field(tmp_path):
    msg, err = _errors(tmp_path, "name: x\nsource: {format: beir, path: d}\nchunk: {max_tokens: lots}\n")
    fields = [f for f, _ in err.problems]
    assert fields == ["chunk.max_tokens"]
    assert "integer" in msg


def test_bad_enum_and_missing_section(tmp_path):
    _, err = _errors(tmp_path, "name: x\nsource: {format: csv, path: d}\n")
    assert err.problems[0][0] == "source.format"
    _, err = _errors(tmp_path, "name: x\n")
    assert err.problems == [("source", "Field required")]


def test_cross_field_rules(tmp_path):
    msg, _ = _errors(tmp_path, "name: x\nsource: {format: beir, path: d}\nchunk: {max_tokens: 64, overlap_tokens: 40}\n")
    assert "overlap_tokens must be less than half" in msg
    msg, _ = _errors(tmp_path, "name: x\nsource: {format: beir, path: d}\nclean: {min_chars: 10, max_chars: 5}\n")
    assert "min_chars (10) exceeds max_chars (5)" in msg


def test_not_yaml_and_missing_file(tmp_path):
    msg, _ = _errors(tmp_path, "name: [unclosed\n")
    assert "not valid YAML" in msg
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    msg, _ = _errors(tmp_path, "- a list\n")
    assert "expected a mapping" in msg


def test_report_is_plain_data_and_excludes_base_dir():
    spec = load_spec(ROOT / "pipelines" / "demo.yaml")
    report = spec.report()
    assert report["chunk"]["max_tokens"] == 64
    assert "base_dir" not in report
    assert PipelineSpec.model_validate({**report, "base_dir": spec.base_dir}) == spec


@pytest.mark.parametrize("field, value, kind", [
    ("alias", "../../x", "alias"),
    ("alias", "", "alias"),
    ("index_name", "a/b", "index name"),
    ("index_name", ".hidden", "index name"),
])
def test_publish_names_follow_the_publish_rules(tmp_path, field, value, kind):
    # The same rule as SnapshotStore (manifest.check_name), so a spec that validates can publish.
    msg, err = _errors(tmp_path, f"name: x\nsource: {{format: beir, path: d}}\npublish: {{{field}: '{value}'}}\n")
    assert [f for f, _ in err.problems] == [f"publish.{field}"]
    assert f"invalid {kind} {value!r}" in msg


def test_pipeline_name_is_a_valid_index_name(tmp_path):
    # The name is the default index name: 200 characters would only fail at publish otherwise.
    _, err = _errors(tmp_path, f"name: {'a' * 200}\nsource: {{format: beir, path: d}}\n")
    assert [f for f, _ in err.problems] == ["name"]
    assert "1-128 characters" in err.problems[0][1]


def test_default_acl_tags_must_not_be_blank(tmp_path):
    _, err = _errors(tmp_path, "name: x\nsource: {format: beir, path: d, default_acl: ['staff', ' ']}\n")
    assert [f for f, _ in err.problems] == ["source.default_acl"]
    assert "blank" in err.problems[0][1]


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_spec_survives_a_json_round_trip_with_its_types(path):
    """Orchestrators hand a spec on as JSON: a default like ``0`` for a float field must already
    be ``0.0``, or files written from the two copies differ (colbert.json did, CLI against Dagster)."""
    spec = load_spec(path)
    again = type(spec).model_validate_json(spec.model_dump_json())
    assert json.dumps(again.model_dump()) == json.dumps(spec.model_dump())
