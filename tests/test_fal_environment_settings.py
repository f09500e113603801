"""The fal server's settings inside ComfyUI (fal_api/settings.py): every KREA_FAL_* environment variable reaches
its setting, an unset one leaves the default `serve` has too, and flags read as the documented "1", "true" or "yes"
in any case. (tests/test_fal_limits.py checks the refusals of numbers that are not above 0.)"""
from __future__ import annotations

import pytest

from comfyui_krea.fal_api import settings as fal_settings
from comfyui_krea.fal_api.settings import ServiceSettings, truthy

VARIABLES = (fal_settings.API_KEY_ENV, fal_settings.RETENTION_ENV, fal_settings.MAX_QUEUE_ENV,
             fal_settings.REMOTE_IMAGES_ENV, fal_settings.REMOTE_LORAS_ENV, fal_settings.MAX_MEGAPIXELS_ENV,
             fal_settings.UPLOAD_QUOTA_ENV, fal_settings.ALLOWED_HOSTS_ENV)


@pytest.fixture
def environment(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_with_no_variables_set_the_settings_are_the_defaults(environment):
    assert ServiceSettings.from_environment() == ServiceSettings()  # the same defaults as `serve`'s options


def test_each_variable_sets_its_setting(environment):
    for name, value in ((fal_settings.API_KEY_ENV, "secret-key"), (fal_settings.RETENTION_ENV, "0.5"),
                        (fal_settings.MAX_QUEUE_ENV, "3"), (fal_settings.REMOTE_IMAGES_ENV, "1"),
                        (fal_settings.REMOTE_LORAS_ENV, "True"), (fal_settings.MAX_MEGAPIXELS_ENV, "1.5"),
                        (fal_settings.UPLOAD_QUOTA_ENV, "64"), (fal_settings.ALLOWED_HOSTS_ENV, "fal.example")):
        environment.setenv(name, value)
    assert ServiceSettings.from_environment() == ServiceSettings(
        retention_hours=0.5, max_queue=3, allow_remote_images=True, allow_remote_loras=True, api_key="secret-key",
        max_megapixels=1.5, upload_quota_mb=64, allowed_hosts=("fal.example",))


def test_remote_images_and_loras_are_allowed_separately(environment):
    environment.setenv(fal_settings.REMOTE_IMAGES_ENV, "yes")
    images_only = ServiceSettings.from_environment()
    assert images_only.allow_remote_images and not images_only.allow_remote_loras
    environment.delenv(fal_settings.REMOTE_IMAGES_ENV)
    environment.setenv(fal_settings.REMOTE_LORAS_ENV, "yes")
    loras_only = ServiceSettings.from_environment()
    assert loras_only.allow_remote_loras and not loras_only.allow_remote_images


def test_an_empty_api_key_means_no_key(environment):
    environment.setenv(fal_settings.API_KEY_ENV, "")
    assert ServiceSettings.from_environment().api_key is None


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "YES", "Yes"])
def test_flags_are_on_for_one_true_or_yes_in_any_case(value):
    assert truthy(value) is True


@pytest.mark.parametrize("value", [None, "", "0", "false", "no", "on", "y"])
def test_flags_are_off_otherwise(value):
    assert truthy(value) is False
