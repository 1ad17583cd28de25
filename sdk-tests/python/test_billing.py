"""Every Billing v2beta1 call of the official Python SDK (`scaleway`), through the gateway.

Each call's answer is checked against another way of getting the same facts: paged calls
against the `*_all` helpers, the JSON download envelope against the raw `dl=1` bytes, the
month's consumption, taxes and FinOps charges against that month's invoice.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import uuid

import pypdf
import pytest
from conftest import (
    DUMMY_ACCESS_KEY,
    ORGANIZATION_ID,
    Credential,
    assert_scaleway_error,
    permitted,
)
from scaleway.billing.v2beta1 import (
    BillingV2Beta1API,
    Discount,
    Invoice,
    ListConsumptionsResponseConsumption,
)
from scaleway_core.api import ScalewayException
from scaleway_core.bridge import Money
from scaleway_core.client import Client

UTC = dt.timezone.utc


def cents(m: Money | None) -> int:
    assert m is not None and m.currency_code == "EUR"
    # units and nanos carry the same sign; Billing amounts have at most two decimals.
    assert m.nanos % 10_000_000 == 0 and (m.units * m.nanos >= 0), m
    return int(m.units) * 100 + m.nanos // 10_000_000


def line_key(c: ListConsumptionsResponseConsumption) -> tuple[str, str]:
    return (c.project_id, c.sku)


def label(t: dt.datetime | None) -> str:
    assert t is not None
    return f"{t.year:04}-{t.month:02}"


@pytest.fixture(scope="session")
def invoices(manager: Credential) -> list[Invoice]:
    """Every invoice, newest first (listed with the manager token, whatever `cred` is)."""
    return manager.api.list_invoices_all(order_by="start_date_desc")


@pytest.fixture(scope="session")
def closed(invoices: list[Invoice]) -> Invoice:
    """The last issued monthly invoice: its month is closed and its figures final."""
    return next(i for i in invoices if i.type_ == "periodic" and i.state == "issued")


@pytest.fixture(scope="session")
def current(invoices: list[Invoice]) -> Invoice:
    """The current month's draft invoice."""
    return next(i for i in invoices if i.state == "draft")


# ---- consumptions ---------------------------------------------------------------------------


def test_consumptions_pages_agree_with_the_all_pages_helper(cred: Credential) -> None:
    first = cred.api.list_consumptions(page_size=7)
    assert first.total_count > 7 and len(first.consumptions) == 7
    assert first.updated_at is not None and first.updated_at.tzinfo is not None

    every = cred.api.list_consumptions_all(page_size=7)
    assert len(every) == first.total_count
    assert every[:7] == first.consumptions
    assert len({line_key(c) for c in every}) == len(every), "no line twice across pages"

    # Without page_size the API answers in one page; the helper stops at the empty page 2.
    unpaged = cred.api.list_consumptions_all()
    assert sorted(map(line_key, unpaged)) == sorted(map(line_key, every))
    for c in every:
        assert c.consumer_id == ORGANIZATION_ID and c.organization_name
        assert cents(c.value) > 0 and int(c.billed_quantity) > 0

    # What both SDKs rely on: JSON labelled exactly so, and no X-Total-Count to misread.
    raw = cred.raw_get("/billing/v2beta1/consumptions", page_size="7")
    assert raw.headers["content-type"] == "application/json"
    assert "x-total-count" not in raw.headers
    assert raw.json()["total_count"] == first.total_count


def test_consumptions_by_project_and_category_partition_the_month(
    cred: Credential,
) -> None:
    every = cred.api.list_consumptions_all(order_by="category_name_asc")
    projects = sorted({c.project_id for c in every})
    assert len(projects) >= 2
    by_project = [cred.api.list_consumptions(project_id=p) for p in projects]
    assert sum(r.total_count for r in by_project) == len(every)
    for project, r in zip(projects, by_project):
        assert {c.project_id for c in r.consumptions} == {project}
        # Filtered answers carry no organization-wide discount.
        assert r.total_discount_untaxed_value == 0

    categories = [c.category_name for c in every]
    assert categories == sorted(categories), "order_by=category_name_asc"
    # A category name with a space travels as `Managed+Databases`.
    db = cred.api.list_consumptions_all(category_name="Managed Databases", page_size=2)
    assert db and len(db) == categories.count("Managed Databases")
    assert {c.category_name for c in db} == {"Managed Databases"}


def test_consumptions_of_a_future_month_are_empty(
    cred: Credential, current: Invoice
) -> None:
    assert current.billing_period is not None
    future = label(current.billing_period + dt.timedelta(days=40))
    r = cred.api.list_consumptions(billing_period=future, page_size=10)
    assert (r.total_count, r.consumptions) == (0, [])
    assert cred.api.list_consumptions_all(billing_period=future, page_size=10) == []


def test_closed_month_consumption_and_taxes_match_its_invoice(
    cred: Credential, closed: Invoice
) -> None:
    month = label(closed.billing_period)
    lines = cred.api.list_consumptions_all(billing_period=month, page_size=100)
    assert sum(cents(c.value) for c in lines) == cents(closed.total_undiscount)
    first = cred.api.list_consumptions(billing_period=month, page_size=1)
    assert round(first.total_discount_untaxed_value * 100) == -cents(closed.total_discount)

    taxes = cred.api.list_taxes(billing_period=month)
    assert taxes.total_count == len(taxes.taxes) == 1
    vat = taxes.taxes[0]
    assert (vat.description, vat.currency, vat.rate) == ("VAT", "EUR", 0.2)
    assert vat.total_tax_value is not None
    assert round(vat.total_tax_value * 100) == cents(closed.total_tax)
    assert cred.api.list_taxes_all(billing_period=month, page_size=1) == taxes.taxes
    assert cred.api.list_taxes_all(billing_period=month) == taxes.taxes


# ---- invoices -------------------------------------------------------------------------------


def test_invoices_pages_agree_with_the_all_pages_helper(cred: Credential) -> None:
    with permitted(cred, "invoices:read"):
        first = cred.api.list_invoices(page_size=4)
        assert first.total_count > 4 and len(first.invoices) == 4
        every = cred.api.list_invoices_all(page_size=4)
        assert len(every) == first.total_count
        assert every[:4] == first.invoices
        assert len({i.id for i in every}) == len(every)
        assert [i.id for i in cred.api.list_invoices_all()] == [i.id for i in every]
        # invoice_number_desc, the default, lists the unnumbered draft first.
        assert every[0].number == 0 and every[0].state == "draft"
        numbers = [i.number for i in every[1:]]
        assert numbers == sorted(numbers, reverse=True) and 0 not in numbers
        for i in every:
            assert i.organization_id == ORGANIZATION_ID
            assert cents(i.total_untaxed) + cents(i.total_tax) == cents(i.total_taxed)


def test_invoice_filters_in_every_python_datetime_form(
    cred: Credential, invoices: list[Invoice]
) -> None:
    starts = sorted(i.start_date for i in invoices if i.type_ == "periodic")
    after, before = starts[2], starts[6]
    want = [i.id for i in invoices if i.type_ == "periodic" and after <= i.start_date < before]
    with permitted(cred, "invoices:read"):
        # Aware datetimes travel as `2026-05-01 00:00:00+00:00`, naive ones without offset.
        for a, b in [
            (after, before),
            (after.astimezone(dt.timezone(dt.timedelta(hours=2))), before),
            (after.replace(tzinfo=None), before.replace(tzinfo=None)),
        ]:
            got = cred.api.list_invoices_all(
                billing_period_start_after=a,
                billing_period_start_before=b,
                invoice_type="periodic",
                order_by="start_date_desc",
            )
            assert [i.id for i in got] == want and len(want) == 4

        purchases = cred.api.list_invoices(invoice_type="purchase", order_by="total_taxed_asc")
        assert purchases.total_count >= 1
        assert {i.type_ for i in purchases.invoices} == {"purchase"}


def test_get_invoice_answers_the_listed_invoice(
    cred: Credential, closed: Invoice
) -> None:
    with permitted(cred, "invoices:read"):
        got = cred.api.get_invoice(invoice_id=closed.id)
        assert got == closed
        assert got.number > 0 and got.issued_date is not None
        assert got.due_date is not None and got.due_date > got.issued_date
    with pytest.raises(ScalewayException) as err:
        cred.api.get_invoice(invoice_id=str(uuid.uuid4()))
    if "invoices:read" in cred.permissions:
        body = assert_scaleway_error(err.value, 404, "not_found")
        assert body["resource"] == "invoice"
    else:
        assert_scaleway_error(err.value, 403, "permissions_denied")


def test_download_invoice_envelope_is_the_raw_pdf(
    cred: Credential, closed: Invoice
) -> None:
    with permitted(cred, "invoices:download"):
        envelope = cred.api.download_invoice(invoice_id=closed.id, file_type="pdf")
        assert envelope.content_type == "application/pdf"
        assert envelope.name.endswith(".pdf") and envelope.name == envelope.name.lower()
        pdf = base64.b64decode(envelope.content, validate=True)
        assert pdf.startswith(b"%PDF-")

        raw = cred.raw_get(f"/billing/v2beta1/invoices/{closed.id}/download", dl="1")
        assert raw.status_code == 200, raw.text
        assert raw.headers["content-type"] == "application/pdf"
        assert "x-total-count" not in raw.headers
        assert raw.content == pdf

        text = pypdf.PdfReader(io.BytesIO(pdf), strict=True).pages[0].extract_text()
        taxed = cents(closed.total_taxed)
        assert f"Invoice {closed.number}" in text
        assert f"Total taxed: {taxed // 100}.{taxed % 100:02} EUR" in text


def test_export_invoices_envelope_is_the_raw_csv(
    cred: Credential, invoices: list[Invoice]
) -> None:
    periodic = [i for i in invoices if i.type_ == "periodic"]
    with permitted(cred, "invoices:download"):
        envelope = cred.api.export_invoices(
            invoice_type="periodic", order_by="start_date_desc", file_type="csv"
        )
        assert envelope.content_type == "text/csv" and envelope.name.endswith(".csv")
        data = base64.b64decode(envelope.content, validate=True)
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        assert [r["id"] for r in rows] == [i.id for i in periodic]
        assert [int(r["number"]) for r in rows] == [i.number for i in periodic]

        raw = cred.raw_get(
            "/billing/v2beta1/export-invoices",
            invoice_type="periodic",
            order_by="start_date_desc",
            dl="1",
        )
        assert raw.status_code == 200, raw.text
        assert raw.headers["content-type"].startswith("text/csv")
        assert raw.content == data

        paged = cred.api.export_invoices(invoice_type="periodic", page=2, page_size=3)
        rows = list(csv.DictReader(io.StringIO(base64.b64decode(paged.content).decode())))
        assert len(rows) == 3


# ---- discounts and coupons ------------------------------------------------------------------


def test_discounts_pages_agree_with_the_all_pages_helper(cred: Credential) -> None:
    with permitted(cred, "discounts:read"):
        first = cred.api.list_discounts(order_by="start_date_asc")
        assert first.total_count == len(first.discounts) >= 2
        every = cred.api.list_discounts_all(page_size=1, order_by="start_date_asc")
        assert every == first.discounts
        starts = [d.start_date for d in every]
        assert starts == sorted(starts)
        for d in every:
            assert d.organization_id == ORGANIZATION_ID
            assert d.value_remaining == pytest.approx(d.value - d.value_used)
        rate = next(d for d in every if d.mode == "discount_mode_rate")
        assert [(f.type_, f.value, f.exclude) for f in rate.filters] == [
            ("category_name", "Compute", False)
        ]


def test_redeem_coupon_returns_a_discount(cred: Credential) -> None:
    code = f"DEMO-SDK-PYTHON-{cred.mode.upper()}"
    with permitted(cred, "coupons:redeem"):
        d = cred.api.redeem_coupon(code=code)
        assert isinstance(d, Discount)
        assert d.organization_id == ORGANIZATION_ID and code in d.description
        assert d.coupon is not None and code in (d.coupon.description or "")
        assert d.value > 0 and d.value_used == 0 and d.value_remaining == d.value
        assert d.start_date is not None and d.stop_date is not None
        assert d.start_date < d.stop_date
    if "coupons:redeem" in cred.permissions:
        with pytest.raises(ScalewayException) as err:
            cred.api.redeem_coupon(code="NO-SUCH-COUPON")
        assert assert_scaleway_error(err.value, 404, "not_found")["resource"] == "coupon"


# ---- FinOps charges -------------------------------------------------------------------------


def all_charges(
    cred: Credential, page_size: int, token: str | None = None, **filters: object
) -> list:
    """Follows next_page_token: the Python SDK has no helper for token pagination."""
    out, pages = [], 0
    while True:
        r = cred.finops.list_charges(page_size=page_size, page_token=token, **filters)
        assert len(r.charges) <= page_size
        out += r.charges
        pages += 1
        token = r.next_page_token
        if token is None:
            return out
        assert len(r.charges) == page_size and pages < 50


def test_charges_token_pages_add_up_to_the_closed_month(
    cred: Credential, closed: Invoice
) -> None:
    window = {"start_date_after": closed.start_date, "end_date_before": closed.stop_date}
    small = all_charges(cred, 400, **window)
    whole = cred.finops.list_charges(page_size=1000, **window)
    assert whole.next_page_token is not None, "a month holds more than 1000 charges"
    rest = all_charges(cred, 1000, whole.next_page_token, **window)
    assert small == whole.charges + rest
    assert len({(c.start_date, c.project_id, c.sku) for c in small}) == len(small)
    assert sum(cents(c.price) for c in small) == cents(closed.total_undiscount)
    for c in small:
        assert c.invoice_id == closed.id and c.organization_id == ORGANIZATION_ID
        assert window["start_date_after"] <= c.start_date < c.end_date <= window["end_date_before"]

    by_invoice = all_charges(cred, 1000, invoice_ids=[closed.id], **window)
    assert len(by_invoice) == len(small)


def test_charges_filters_and_order(cred: Credential, closed: Invoice) -> None:
    lines = cred.api.list_consumptions_all(billing_period=label(closed.billing_period))
    projects = sorted({c.project_id for c in lines})[:2]
    sku = lines[0].sku
    want = {
        line_key(c): cents(c.value)
        for c in lines
        if c.project_id in projects and c.sku == sku
    }
    assert len(want) == 2
    charges = all_charges(
        cred,
        1000,
        project_ids=projects,
        skus=[sku],
        start_date_after=closed.start_date,
        end_date_before=closed.stop_date,
        clamp_to_time_range=True,
        order_by="start_date_desc",
    )
    got: dict[tuple[str, str], int] = {}
    for c in charges:
        got[(c.project_id, c.sku)] = got.get((c.project_id, c.sku), 0) + cents(c.price)
    # Each line's daily charges add up to its monthly consumption.
    assert got == want
    starts = [c.start_date for c in charges]
    assert starts == sorted(starts, reverse=True)
    resource = charges[0].resource_id
    only = cred.finops.list_charges(
        resource_ids=[resource],
        start_date_after=closed.start_date,
        end_date_before=closed.stop_date,
    )
    assert only.charges and {c.resource_id for c in only.charges} == {resource}


# ---- refusals -------------------------------------------------------------------------------


def test_bad_arguments_are_a_400_invalid_arguments(cred: Credential) -> None:
    with pytest.raises(ScalewayException) as err:
        cred.api.list_consumptions(page_size=101)
    body = assert_scaleway_error(err.value, 400, "invalid_arguments")
    assert [(d["argument_name"], d["reason"]) for d in body["details"]] == [
        ("page_size", "format")
    ]
    with pytest.raises(ScalewayException) as err:
        cred.api.get_invoice(invoice_id="not-a-uuid")
    assert_scaleway_error(err.value, 400, "invalid_arguments")


def test_another_organization_is_refused(cred: Credential) -> None:
    with pytest.raises(ScalewayException) as err:
        cred.api.list_consumptions(organization_id=str(uuid.uuid4()))
    assert_scaleway_error(err.value, 403, "permissions_denied")


def test_read_only_token_is_refused_invoices(reader: Credential) -> None:
    assert reader.api.list_consumptions(page_size=1).total_count > 0
    assert "invoices:read" not in reader.permissions
    for call in [
        lambda: reader.api.list_invoices(),
        lambda: reader.api.list_invoices_all(page_size=5),
        lambda: reader.api.export_invoices(),
        lambda: reader.api.list_discounts(),
        lambda: reader.api.redeem_coupon(code="DEMO-READER"),
    ]:
        with pytest.raises(ScalewayException) as err:
            call()
        body = assert_scaleway_error(err.value, 403, "permissions_denied")
        assert body["details"][0]["action"] in ("read", "write")


def test_unknown_credentials_are_a_401(gateway_url: str) -> None:
    forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl"
    api = BillingV2Beta1API(Client(secret_key=forged, api_url=gateway_url), bypass_validation=True)
    with pytest.raises(ScalewayException) as err:
        api.list_taxes()
    assert assert_scaleway_error(err.value, 401, "denied_authentication")["method"] == "jwt"

    # An unknown key passes the SDK's own checks (it is a UUID) and is refused by the gateway.
    client = Client(
        access_key=DUMMY_ACCESS_KEY, secret_key=str(uuid.uuid4()), api_url=gateway_url
    )
    with pytest.raises(ScalewayException) as err:
        BillingV2Beta1API(client).list_taxes()
    assert assert_scaleway_error(err.value, 401, "denied_authentication")["method"] == "api_key"


def test_the_sdk_itself_refuses_a_jwt_unless_validation_is_bypassed(
    manager: Credential,
) -> None:
    """Why the JWT mode needs `bypass_validation=True` (no request is sent)."""
    client = Client(access_key=DUMMY_ACCESS_KEY, secret_key=manager.token, api_url=manager.url)
    with pytest.raises(ValueError, match="secret key"):
        BillingV2Beta1API(client)
