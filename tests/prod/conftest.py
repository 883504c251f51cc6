"""The production-profile tier (`make prod-test`): real servers on loopback, see infra/prodtest.py."""


def pytest_configure(config):
    config.addinivalue_line("markers", "prod: the production profile end to end (infra/prodtest.py); make prod-test")
