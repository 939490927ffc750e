"""Client profiles for simulations; the definitions live in `client.profiles` (a deployed node needs them too)."""

from client.profiles import PROFILES, ClientProfile, assign_profiles, federation_model, parse_profile_mix

__all__ = ["PROFILES", "ClientProfile", "assign_profiles", "federation_model", "parse_profile_mix"]
