"""Fixtures for driving the official Scaleway Python SDK through a running `billing-gateway demo`.

../run.sh starts the demo and passes what it printed in the environment:
BILLING_GATEWAY_URL, BILLING_GATEWAY_MANAGER, BILLING_GATEWAY_READ_ONLY (JWTs) and, once the
demo prints one, BILLING_GATEWAY_KEY (a gateway key, a UUID).

Every test taking `cred` runs once per auth mode:
- "jwt": a JWT as the SDK's secret key, with `bypass_validation=True` (the SDK otherwise
  insists on a UUID);
- "gateway_key": the gateway key as an unmodified `SCW_SECRET_KEY`, loaded by
  `Client.from_env()` with a dummy access key, the SDK's own validation left on. Skipped, with
  the reason printed, while the demo prints no `GATEWAY_KEY=` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

import pytest
import requests
from scaleway.billing.v2beta1 import BillingV2Beta1API, BillingV2Beta1FinOpsAPI
from scaleway_core.api import ScalewayException
from scaleway_core.client import Client

ORGANIZATION_ID = "11111111-2222-3333-4444-555555555555"
# Well-formed and never sent: the SDK only checks its shape.
DUMMY_ACCESS_KEY = "SCWXXXXXXXXXXXXXXXXX"
# What the battery needs; the demo's manager token must hold all of them.
PERMISSIONS = (
    "consumption:read",
    "invoices:read",
    "invoices:download",
    "discounts:read",
    "coupons:redeem",
)
KEY_MISSING = (
    "gateway-key mode (SCW_SECRET_KEY=<gateway key>) not run: "
    "`billing-gateway demo` printed no GATEWAY_KEY= line"
)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(
            f"{name} is not set: run sdk-tests/run.sh, which starts `billing-gateway demo`",
            returncode=2,
        )
    return value


@dataclasses.dataclass(frozen=True)
class Credential:
    """One caller: the SDK APIs built for it and what the gateway lets it do."""

    mode: str
    url: str
    token: str
    api: BillingV2Beta1API
    finops: BillingV2Beta1FinOpsAPI
    # Organization-wide permissions, as /gateway/v1/whoami reports them.
    permissions: frozenset[str]

    def raw_get(self, path: str, **params: str) -> requests.Response:
        """A plain HTTP GET with the same credential, for what the Python SDK cannot ask
        (`dl=1`) and to cross-check the SDK's answers."""
        return requests.get(
            f"{self.url}{path}",
            params=params,
            headers={"x-auth-token": self.token},
            timeout=30,
        )


def whoami(url: str, token: str) -> frozenset[str]:
    r = requests.get(
        f"{url}/gateway/v1/whoami", headers={"x-auth-token": token}, timeout=30
    )
    assert r.status_code == 200, r.text
    grants = r.json()["grants"]
    return frozenset(
        p for g in grants if not g.get("projects") for p in g["permissions"]
    )


def jwt_credential(url: str, token: str) -> Credential:
    client = Client(secret_key=token, api_url=url)
    return Credential(
        mode="jwt",
        url=url,
        token=token,
        api=BillingV2Beta1API(client, bypass_validation=True),
        finops=BillingV2Beta1FinOpsAPI(client, bypass_validation=True),
        permissions=whoami(url, token),
    )


def key_credential(url: str, key: str) -> Credential:
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("SCW_")]:
            env.delenv(name)
        env.setenv("SCW_ACCESS_KEY", DUMMY_ACCESS_KEY)
        env.setenv("SCW_SECRET_KEY", key)
        env.setenv("SCW_API_URL", url)
        # As a real profile would have it: the SDK then fills organization_id in itself.
        env.setenv("SCW_DEFAULT_ORGANIZATION_ID", ORGANIZATION_ID)
        client = Client.from_env()
    assert client.default_organization_id == ORGANIZATION_ID
    # No bypass: the key must pass the SDK's own credential checks as it is.
    return Credential(
        mode="gateway_key",
        url=url,
        token=key,
        api=BillingV2Beta1API(client),
        finops=BillingV2Beta1FinOpsAPI(client),
        permissions=whoami(url, key),
    )


@pytest.fixture(scope="session")
def gateway_url() -> str:
    return _env("BILLING_GATEWAY_URL")


@pytest.fixture(scope="session")
def manager(gateway_url: str) -> Credential:
    cred = jwt_credential(gateway_url, _env("BILLING_GATEWAY_MANAGER"))
    missing = set(PERMISSIONS) - cred.permissions
    assert not missing, f"the demo's manager token lacks {missing}"
    return cred


@pytest.fixture(scope="session")
def reader(gateway_url: str) -> Credential:
    return jwt_credential(gateway_url, _env("BILLING_GATEWAY_READ_ONLY"))


@pytest.fixture(scope="session", params=["jwt", "gateway_key"])
def cred(request: pytest.FixtureRequest, gateway_url: str, manager: Credential) -> Credential:
    if request.param == "jwt":
        return manager
    key = os.environ.get("BILLING_GATEWAY_KEY")
    if not key:
        pytest.skip(KEY_MISSING)
    return key_credential(gateway_url, key)


def assert_scaleway_error(err: ScalewayException, status: int, kind: str) -> dict:
    """The SDK's exception carries the gateway's Scaleway-shaped JSON body."""
    assert type(err) is ScalewayException
    assert err.status_code == status, err.response.text
    body = err.response.json()
    assert body["type"] == kind, body
    assert isinstance(body["message"], str) and body["message"]
    return body


@contextlib.contextmanager
def permitted(cred: Credential, permission: str) -> Iterator[None]:
    """Runs the block as is when `cred` holds `permission`; otherwise the block must fail with
    the SDK's permission error (a gateway key may hold fewer roles than the manager token)."""
    if permission in cred.permissions:
        yield
        return
    with pytest.raises(ScalewayException) as err:
        yield
    assert_scaleway_error(err.value, 403, "permissions_denied")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not os.environ.get("BILLING_GATEWAY_KEY"):
        terminalreporter.write_line(f"NOTICE: {KEY_MISSING}", yellow=True)
