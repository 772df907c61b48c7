"""The features column config: the spec comes back out of it whatever else the stage records."""

from __future__ import annotations

import dataclasses

import pytest

from dualpm.errors import ConfigError
from dualpm.features import FeatureSpec
from dualpm.features.column import EXTRA_CONFIG_KEYS, VOLATILE, spec_from_column, uses_basis


@pytest.mark.parametrize("spec", [
    FeatureSpec("sd-dino", sd_path="/w/sd", dino_path="/w/dino", dim=16, timestep=50),
    FeatureSpec("dino", dino_path="/w/dino", dino_image_size=112),
    FeatureSpec("rgb", grid=8, rgb_mask_channel=True),
    FeatureSpec("precomputed", dim=64, grid=4),
])
def test_spec_round_trips_through_the_column_config(spec):
    extras = {"basis": None, "basis_sha256": "ab" * 32, "model_id": "m", "pca_samples": 4, "batch": 8,
              "device": "cpu", "threads": 1, "schema_version": 1, "tool_version": "0.1.0"}
    assert set(extras) == set(EXTRA_CONFIG_KEYS)
    assert spec_from_column(spec.to_dict() | extras) == spec


def test_extra_keys_are_not_spec_fields_and_other_keys_are_refused():
    assert not set(EXTRA_CONFIG_KEYS) & {f.name for f in dataclasses.fields(FeatureSpec)}
    assert {"sd_path", "dino_path", "cuda_bf16"} <= set(VOLATILE)  # where the weights are, not what they are
    with pytest.raises(ConfigError, match="unknown options: colour"):
        spec_from_column(FeatureSpec("rgb").to_dict() | {"colour": "red"})


def test_only_the_model_extractors_fit_a_pca_basis():
    specs = [FeatureSpec("sd-dino", sd_path="/w/sd", dino_path="/w/dino"), FeatureSpec("dino", dino_path="/w/dino"),
             FeatureSpec("rgb"), FeatureSpec("precomputed", grid=4)]
    assert [uses_basis(spec) for spec in specs] == [True, True, False, False]
