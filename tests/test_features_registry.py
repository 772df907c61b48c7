"""The extractor registry: which class builds each extractor name; precomputed is read, never built."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dualpm.errors import ConfigError
from dualpm.features import EXTRACTORS, FeatureSpec
from dualpm.features.registry import REGISTRY, build_extractor
from dualpm.features.rgb import RgbExtractor


def test_every_extractor_but_precomputed_has_a_class():
    assert set(REGISTRY) == set(EXTRACTORS) - {"precomputed"}


def test_build_extractor_makes_the_registered_class_for_the_spec_on_the_device():
    spec = FeatureSpec("rgb", grid=8)
    extractor = build_extractor(spec, "cpu")
    assert type(extractor) is RgbExtractor
    assert extractor.spec == spec and extractor.device == torch.device("cpu") and extractor.grid == (8, 8)


def test_precomputed_has_nothing_to_build():
    with pytest.raises(ConfigError, match="read_packed"):
        build_extractor(FeatureSpec("precomputed", grid=60))


def test_importing_the_registry_loads_no_model_library():
    # diffusers and transformers take seconds to import: only building sd-dino / dino may load them.
    code = ("import sys, dualpm.features.registry; "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=True)
    assert proc.stdout.strip() == "[]"
