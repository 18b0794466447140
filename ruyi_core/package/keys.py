"""The model registry's keys in the store: the one place that builds or reads them.

    models/<family>/<version>/<tier>/        one package per tier (an artifact)
    models/<family>/<version>/routing.json   the version's calibrated `auto` routing
    models/<family>/<version>/ablations.json the version's ablations, each against its control (bench/ablations.py)
    models/<family>/index.json               every version's gate decisions and each tier's promoted version
    models/<family>/deploy.yaml              KServe services for the promoted tiers

Published stores hold these keys: changing a layout string orphans what they hold.
"""
from __future__ import annotations

from typing import NamedTuple

from ruyi_core.store.artifact import clean_key

ROOT = "models"
# A template, so the package stage's key (formatted by the stage contract) is this very layout.
PACKAGE = ROOT + "/{family}/{version}/{tier}"
INDEX, DEPLOY, ROUTING, ABLATIONS = "index.json", "deploy.yaml", "routing.json", "ablations.json"


class PackageKey(NamedTuple):
    family: str
    version: str
    tier: str


def family_prefix(family: str) -> str:
    return f"{ROOT}/{clean_key(family, 'family')}"


def package_key(family: str, version: str, tier: str) -> str:
    return PACKAGE.format(family=clean_key(family, "family"), version=clean_key(version, "version"),
                          tier=clean_key(tier, "tier"))


def index_key(family: str) -> str:
    return f"{family_prefix(family)}/{INDEX}"


def deploy_key(family: str) -> str:
    return f"{family_prefix(family)}/{DEPLOY}"


def routing_key(family: str, version: str) -> str:
    return f"{family_prefix(family)}/{clean_key(version, 'version')}/{ROUTING}"


def ablations_key(family: str, version: str) -> str:
    return f"{family_prefix(family)}/{clean_key(version, 'version')}/{ABLATIONS}"


def parse_package(key: str) -> PackageKey | None:
    """The parts of a package's key (models/<family>/<version>/<tier>); None for any other key."""
    parts = key.strip("/").split("/")
    if len(parts) != 4 or parts[0] != ROOT or not all(parts) or parts[3] == ROUTING:  # routing sits at a tier's depth
        return None
    return PackageKey(*parts[1:])
