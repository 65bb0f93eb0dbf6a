"""The synthetic study's schema: arms need the block, the runner owns the source, shrink overrides the block,
and a filter that kept no sample of a class stops the study in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.studies.test_runner import write_study
from tus.config import ConfigError
from tus.studies import schema
from tus.studies.synthetic import check_kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("arms: {a: {row: {Arm: x}, synthetic: added}}", r"arms.a.synthetic: 'added' needs the study's synthetic: block"),
        ("synthetic: {per_class: 4}\\narms: {a: {row: {Arm: x}, synthetic: only, finetune: [data.synthetic.source=x]}}", r"data.synthetic.source/only are set by the runner"),
        ("synthetic: {per_class: 0}\\narms: {a: {row: {Arm: x}}}", r"synthetic.per_class must be >= 1"),
        ("arms: {a: {row: {Arm: x}, synthetic: some}}", r"arms.a.synthetic"),
    ],
)
def test_a_synthetic_study_with_a_wrong_option_fails(tmp_path, text, message):
    with pytest.raises(schema.StudyError, match=message):
        schema.load_study(write_study(tmp_path, text.replace("\\n", "\n")))


def test_block_overrides_parse_values_and_refuse_unknown_keys():
    block = schema.SyntheticStudy().with_overrides(["per_class=8", "filter_k=null", "guidance=2"])
    assert (block.per_class, block.filter_k, block.guidance) == (8, None, 2.0)
    with pytest.raises(ConfigError, match="synthetic: no key 'per_klass'"):
        schema.SyntheticStudy().with_overrides(["per_klass=8"])


def test_a_filter_that_kept_no_sample_of_a_class_stops_the_study(tmp_path):
    study = schema.Study("s", tmp_path / "s.yaml", schema.StudyConfig())
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "filter.json").write_text(json.dumps({"per_class": {"0": {"generated": 8, "kept": 3}, "1": {"generated": 8, "kept": 0}}}))
    with pytest.raises(schema.StudyError, match=r"fold 1's filter kept none of the samples of class\(es\) 1 .*raise synthetic.filter_k"):
        check_kept(study, tmp_path / "synthetic", 1)
    (tmp_path / "synthetic" / "filter.json").write_text(json.dumps({"per_class": {"0": {"generated": 8, "kept": 3}, "1": {"generated": 8, "kept": 1}}}))
    check_kept(study, tmp_path / "synthetic", 1)


def test_an_unknown_block_override_stops_the_study_before_anything_runs(tmp_path):
    from tests.helpers import make_labeled_dataset
    from tus.studies import runner

    manifest = make_labeled_dataset(tmp_path / "data", patients=6, size=16)
    study = schema.load_study(Path(__file__).resolve().parents[2] / "experiments" / "studies" / "synthetic.yaml")
    with pytest.raises(schema.StudyError, match="synthetic: no key 'per_klass'"):
        runner.run_study(study, tmp_path / "out", variables={"TUS_LABELED": str(manifest)}, shrink=True, extra=schema.StageOverrides(synthetic=["per_klass=1"]))
    assert not (tmp_path / "out" / "synthetic-shrink" / "_synthetic").exists()
