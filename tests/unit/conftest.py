"""Shared fixtures for the pure-logic unit tests: the real schemas/ and config/ of the
checkout and a serializer without a registry."""

from __future__ import annotations

import pytest

from pipeline.router.rules import RuleSet, load_rules
from pipeline.router.templates import Templates
from pipeline.schemas import SchemaSet, load_schemas
from pipeline.serialization import AvroSerde
from tests.unit.unit_helpers import RULES_FILE, SCHEMAS_DIR, TEMPLATES_DIR


@pytest.fixture(scope="session")
def schemas() -> SchemaSet:
    return load_schemas(SCHEMAS_DIR)


@pytest.fixture
def serde(schemas: SchemaSet) -> AvroSerde:
    return AvroSerde(schemas)


@pytest.fixture(scope="session")
def rules() -> RuleSet:
    return load_rules(RULES_FILE)


@pytest.fixture(scope="session")
def templates() -> Templates:
    return Templates(TEMPLATES_DIR)
