"""The test tiers (tests/conftest.py): every test has exactly one of unit, integration and
e2e; no test that starts a service or runs the whole pipeline is `unit`; the tables that
assign them name only tests and fixtures that exist. And the test modules share helpers
through helpers.py, tiny.py and fixtures_services.py, not by importing one another."""
import ast

from helpers import TESTS


def test_every_collected_test_has_exactly_one_tier(tiered_suite):
    assert len(tiered_suite.tests) > 100, "not the whole suite"
    wrong = [(t["id"], t["tiers"]) for t in tiered_suite.tests if len(t["tiers"]) != 1]
    assert not wrong, wrong
    counts = {tier: sum(t["tiers"] == [tier] for t in tiered_suite.tests) for tier in tiered_suite.tiers}
    assert all(counts.values()), counts


def test_services_and_the_whole_pipeline_are_never_unit(tiered_suite):
    for t in tiered_suite.tests:
        fixtures = set(t["fixtures"])
        if fixtures & tiered_suite.e2e_fixtures:
            assert t["tiers"] == ["e2e"], (t["id"], fixtures & tiered_suite.e2e_fixtures)
        elif fixtures & tiered_suite.service_fixtures:
            assert t["tiers"] != ["unit"], (t["id"], fixtures & tiered_suite.service_fixtures)
        if t["key"] in tiered_suite.e2e_tests | tiered_suite.integration_tests:
            assert t["tiers"] != ["unit"], t["id"]


def test_the_tier_tables_name_only_what_exists(tiered_suite):
    keys = {t["key"] for t in tiered_suite.tests}
    used = {f for t in tiered_suite.tests for f in t["fixtures"]}
    assert not (tiered_suite.e2e_tests | tiered_suite.integration_tests) - keys
    assert not tiered_suite.e2e_tests & tiered_suite.integration_tests
    assert not (tiered_suite.e2e_fixtures | tiered_suite.service_fixtures) - used
    assert not set(tiered_suite.same_worker) - tiered_suite.files


def _imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another_or_a_conftest():
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        bad = {m for m in _imported_modules(path) if m.startswith("test_") or m == "conftest"}
        if bad:
            offenders[path.relative_to(TESTS).as_posix()] = sorted(bad)
    assert not offenders, offenders
