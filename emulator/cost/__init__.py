"""Cost model (pure): roofline compute per layer part (compute.py), alpha-beta collectives
from a communication profile (comm.py, files in profile_io.py), and the per-plan step cost
the simulator and the Ray workers share (step.py)."""

from emulator.cost.comm import CommEntry, CommProfile, ProfileError, all_to_all_bytes, placement_of
from emulator.cost.compute import Efficiency
from emulator.cost.profile_io import load_profile, save_profile
from emulator.cost.step import CostModel, plan_latency_s

__all__ = ["CommEntry", "CommProfile", "CostModel", "Efficiency", "ProfileError",
           "all_to_all_bytes", "load_profile", "placement_of", "plan_latency_s", "save_profile"]
