"""The NSFW image classifier behind the safety check: model and preprocessing, layouts, loading, random weights."""
from .layouts import WHERE_TO_GET_IT, config_from_checkpoint
from .loading import load_safety_checker
from .model import DEMO_SAFETY_CONFIG, FALCONSAI_NSFW_CONFIG, SafetyChecker, SafetyCheckerConfig
from .random_weights import hf_config_json, random_safety_state_dict, write_random_safety_checkpoint

__all__ = ["DEMO_SAFETY_CONFIG", "FALCONSAI_NSFW_CONFIG", "WHERE_TO_GET_IT", "SafetyChecker", "SafetyCheckerConfig",
           "config_from_checkpoint", "hf_config_json", "load_safety_checker", "random_safety_state_dict",
           "write_random_safety_checkpoint"]
