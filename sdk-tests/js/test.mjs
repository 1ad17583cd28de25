// Every Billing v2beta1 call of the official Scaleway JS SDK (@scaleway/sdk-billing on
// @scaleway/sdk-client, versions pinned by package-lock.json), through `billing-gateway demo`.
//
// ../run.sh starts the demo and passes what it printed: BILLING_GATEWAY_URL,
// BILLING_GATEWAY_MANAGER and BILLING_GATEWAY_READ_ONLY (JWTs) and, once the demo prints one,
// BILLING_GATEWAY_KEY (a gateway key). The battery runs once per auth mode:
// - "jwt": no accessKey/secretKey, a request interceptor sets `x-auth-token` to the JWT;
// - "gateway key": the key as an unmodified SCW_SECRET_KEY (with a dummy SCW_ACCESS_KEY), the
//   profile loaded by @scaleway/configuration-loader and checked by the SDK as usual. Skipped,
//   with a notice, while the demo prints no GATEWAY_KEY= line.
//
// Run: node --test --test-reporter=tap test.mjs

import assert from 'node:assert/strict'
import { Buffer } from 'node:buffer'
import { randomUUID } from 'node:crypto'
import { describe, it } from 'node:test'

import { loadProfileFromEnvironmentValues } from '@scaleway/configuration-loader'
import { Billingv2beta1 } from '@scaleway/sdk-billing'
import { Errors, addAsyncHeaderInterceptor, createClient } from '@scaleway/sdk-client'

const ORGANIZATION_ID = '11111111-2222-3333-4444-555555555555'
const DUMMY_ACCESS_KEY = 'SCWXXXXXXXXXXXXXXXXX'
const PERMISSIONS = ['consumption:read', 'invoices:read', 'invoices:download', 'discounts:read', 'coupons:redeem']
const KEY_MISSING =
  'gateway-key mode (SCW_SECRET_KEY=<gateway key>) not run: `billing-gateway demo` printed no GATEWAY_KEY= line'

const env = (name) => {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: run sdk-tests/run.sh, which starts \`billing-gateway demo\``)
  return value
}
const URL_ = env('BILLING_GATEWAY_URL')
const MANAGER = env('BILLING_GATEWAY_MANAGER')
const READ_ONLY = env('BILLING_GATEWAY_READ_ONLY')
const KEY = process.env.BILLING_GATEWAY_KEY
if (!KEY) console.log(`NOTICE: ${KEY_MISSING}`)

/** A plain request with the same credential: to cross-check what the SDK returned. */
const rawGet = (token, path) => fetch(`${URL_}${path}`, { headers: { 'x-auth-token': token } })

/** Organization-wide permissions of a credential, as the gateway sees them. */
async function whoami(token) {
  const r = await rawGet(token, '/gateway/v1/whoami')
  assert.equal(r.status, 200)
  const { grants } = await r.json()
  return new Set(grants.filter((g) => !g.projects?.length).flatMap((g) => g.permissions))
}

/** Mode 1: a JWT, set by the SDK's own header-interceptor helper; no access/secret key. */
function jwtClient(jwt, settings = {}) {
  return createClient({
    apiURL: URL_,
    interceptors: [{ request: addAsyncHeaderInterceptor('x-auth-token', async () => jwt) }],
    ...settings,
  })
}

/** Mode 2: the gateway key as an unmodified SCW_SECRET_KEY, loaded the SDK's way. */
function keyClient(key, settings = {}) {
  const saved = { ...process.env }
  try {
    for (const name of Object.keys(process.env)) if (name.startsWith('SCW_')) delete process.env[name]
    Object.assign(process.env, {
      SCW_ACCESS_KEY: DUMMY_ACCESS_KEY,
      SCW_SECRET_KEY: key,
      SCW_API_URL: URL_,
      SCW_DEFAULT_ORGANIZATION_ID: ORGANIZATION_ID,
    })
    return createClient({ ...loadProfileFromEnvironmentValues(), ...settings })
  } finally {
    for (const name of Object.keys(process.env)) if (!(name in saved)) delete process.env[name]
    Object.assign(process.env, saved)
  }
}

/** Runs `fn` when the credential holds `permission`; otherwise it must fail with the SDK's
 * permission error (a gateway key may hold fewer roles than the manager token). */
async function permitted(cred, permission, fn) {
  if (cred.permissions.has(permission)) return fn()
  await assert.rejects(fn, Errors.PermissionsDeniedError)
}

const cents = (m) => {
  assert.equal(m.currencyCode, 'EUR')
  assert.equal(m.nanos % 10_000_000, 0)
  return m.units * 100 + m.nanos / 10_000_000
}
const label = (d) => d.toISOString().slice(0, 7)
const lineKey = (c) => `${c.projectId} ${c.sku}`

/** Drains the SDK's async iterator: one array per page. */
async function pages(paginated) {
  const out = []
  for await (const page of paginated) out.push(page)
  return out
}

/** Runs `f` once, on first use: a failure then fails every test that needs it (a `before` hook
 * would cancel them instead, and the runner would count no failure). */
const once = (f) => {
  let p
  return () => (p ??= f())
}

// Every invoice, newest first, listed with the manager token whatever the mode.
const manager = new Billingv2beta1.API(jwtClient(MANAGER))
let invoices
let closed
let current
const fixtures = once(async () => {
  invoices = await manager.listInvoices({ orderBy: 'start_date_desc', pageSize: 5 }).all()
  closed = invoices.find((i) => i.type === 'periodic' && i.state === 'issued')
  current = invoices.find((i) => i.state === 'draft')
  assert.ok(closed && current)
})

function battery(mode, makeClient, token) {
  const cred = { api: undefined, permissions: new Set() }
  const setUp = once(async () => {
    await fixtures()
    cred.api = new Billingv2beta1.API(makeClient())
    cred.permissions = await whoami(token)
    if (mode === 'jwt') for (const p of PERMISSIONS) assert.ok(cred.permissions.has(p), `manager lacks ${p}`)
  })
  const check = (name, fn) =>
    it(name, async () => {
      await setUp()
      await fn()
    })

  check('listConsumptions: one page, .all() and the async iterator agree', async () => {
    const { api } = cred
    const first = await api.listConsumptions({ pageSize: 7 })
    assert.ok(first.totalCount > 7)
    assert.equal(first.consumptions.length, 7)
    assert.ok(first.updatedAt instanceof Date)

    const all = await api.listConsumptions({ pageSize: 7 }).all()
    assert.equal(all.length, first.totalCount)
    assert.deepEqual(all.slice(0, 7), first.consumptions)
    assert.equal(new Set(all.map(lineKey)).size, all.length, 'no line twice across pages')

    const iterated = await pages(api.listConsumptions({ pageSize: 7 }))
    assert.equal(iterated.length, Math.ceil(first.totalCount / 7))
    assert.deepEqual(iterated.flat(), all)

    const unpaged = await api.listConsumptions().all()
    assert.deepEqual(unpaged.map(lineKey).sort(), all.map(lineKey).sort())
    for (const c of all) {
      assert.equal(c.consumerId, ORGANIZATION_ID)
      assert.ok(cents(c.value) > 0 && Number(c.billedQuantity) > 0)
    }
  })

  check('listConsumptions: per project (defaultProjectId) and per category partition the month', async () => {
    const all = await cred.api.listConsumptions({ orderBy: 'category_name_asc' }).all()
    const projects = [...new Set(all.map((c) => c.projectId))].sort()
    assert.ok(projects.length >= 2)
    let total = 0
    for (const projectId of projects) {
      // The JS SDK sends the client's default project as project_id when no organization is set.
      const api = new Billingv2beta1.API(makeClient({ defaultProjectId: projectId, defaultOrganizationId: undefined }))
      const lines = await api.listConsumptions({ pageSize: 6 }).all()
      assert.deepEqual([...new Set(lines.map((c) => c.projectId))], [projectId])
      total += lines.length
    }
    assert.equal(total, all.length)

    const categories = all.map((c) => c.categoryName)
    assert.deepEqual(categories, [...categories].sort())
    const db = await cred.api.listConsumptions({ categoryName: 'Managed Databases', pageSize: 2 }).all()
    assert.equal(db.length, categories.filter((c) => c === 'Managed Databases').length)
    assert.ok(db.length > 0 && db.every((c) => c.categoryName === 'Managed Databases'))
  })

  check('listConsumptions: a future month is empty', async () => {
    const future = label(new Date(current.billingPeriod.getTime() + 40 * 86400e3))
    const first = await cred.api.listConsumptions({ billingPeriod: future, pageSize: 10 })
    assert.deepEqual([first.totalCount, first.consumptions], [0, []])
    assert.deepEqual(await cred.api.listConsumptions({ billingPeriod: future, pageSize: 10 }).all(), [])
  })

  check('listConsumptions and listTaxes of a closed month match its invoice', async () => {
    const billingPeriod = label(closed.billingPeriod)
    const lines = await cred.api.listConsumptions({ billingPeriod, pageSize: 100 }).all()
    assert.equal(lines.reduce((s, c) => s + cents(c.value), 0), cents(closed.totalUndiscount))

    const taxes = await cred.api.listTaxes({ billingPeriod })
    assert.equal(taxes.totalCount, 1)
    const [vat] = taxes.taxes
    assert.deepEqual([vat.description, vat.currency, vat.rate], ['VAT', 'EUR', 0.2])
    assert.equal(Math.round(vat.totalTaxValue * 100), cents(closed.totalTax))
    assert.deepEqual(await cred.api.listTaxes({ billingPeriod, pageSize: 1 }).all(), taxes.taxes)
    assert.deepEqual((await pages(cred.api.listTaxes({ billingPeriod }))).flat(), taxes.taxes)
  })

  check('listInvoices: one page, .all() and the async iterator agree', () =>
    permitted(cred, 'invoices:read', async () => {
      const first = await cred.api.listInvoices({ pageSize: 4 })
      assert.ok(first.totalCount > 4)
      const all = await cred.api.listInvoices({ pageSize: 4 }).all()
      assert.equal(all.length, first.totalCount)
      assert.deepEqual(all.slice(0, 4), first.invoices)
      assert.equal(new Set(all.map((i) => i.id)).size, all.length)
      assert.deepEqual((await pages(cred.api.listInvoices({ pageSize: 4 }))).flat(), all)
      // invoice_number_desc, the default, lists the unnumbered draft first.
      assert.equal(all[0].state, 'draft')
      for (const i of all) assert.equal(cents(i.totalUntaxed) + cents(i.totalTax), cents(i.totalTaxed))
    }))

  check('listInvoices: Date filters travel as ISO strings and select the window', () =>
    permitted(cred, 'invoices:read', async () => {
      const periodic = invoices.filter((i) => i.type === 'periodic')
      const starts = periodic.map((i) => i.startDate.getTime()).sort((a, b) => a - b)
      const [after, until] = [new Date(starts[2]), new Date(starts[6])]
      const want = periodic.filter((i) => i.startDate >= after && i.startDate < until).map((i) => i.id)
      const got = await cred.api
        .listInvoices({
          billingPeriodStartAfter: after,
          billingPeriodStartBefore: until,
          invoiceType: 'periodic',
          orderBy: 'start_date_desc',
        })
        .all()
      assert.equal(want.length, 4)
      assert.deepEqual(
        got.map((i) => i.id),
        want,
      )
      const purchases = await cred.api.listInvoices({ invoiceType: 'purchase' })
      assert.ok(purchases.totalCount >= 1 && purchases.invoices.every((i) => i.type === 'purchase'))
    }))

  check('getInvoice answers the listed invoice; an unknown id is ResourceNotFoundError', async () => {
    await permitted(cred, 'invoices:read', async () => {
      const got = await cred.api.getInvoice({ invoiceId: closed.id })
      assert.deepEqual(got, closed)
      assert.ok(got.number > 0 && got.dueDate > got.issuedDate)
      const err = await cred.api.getInvoice({ invoiceId: randomUUID() }).catch((e) => e)
      assert.ok(err instanceof Errors.ResourceNotFoundError, String(err))
      assert.equal(err.resource, 'invoice')
    })
  })

  check('downloadInvoice (dl=1) returns the PDF bytes the JSON envelope holds', () =>
    permitted(cred, 'invoices:download', async () => {
      const blob = await cred.api.downloadInvoice({ invoiceId: closed.id, fileType: 'pdf' })
      assert.ok(blob instanceof Blob)
      assert.equal(blob.type, 'application/pdf')
      const pdf = Buffer.from(await blob.arrayBuffer())
      assert.equal(pdf.subarray(0, 5).toString('latin1'), '%PDF-')
      assert.ok(pdf.includes(`Invoice ${closed.number}`))

      // What the Go and Python SDKs get: the envelope, without dl.
      const r = await rawGet(token, `/billing/v2beta1/invoices/${closed.id}/download?file_type=pdf`)
      assert.equal(r.headers.get('content-type'), 'application/json')
      const envelope = await r.json()
      assert.equal(envelope.content_type, 'application/pdf')
      assert.ok(envelope.name.endsWith('.pdf'))
      assert.deepEqual(Buffer.from(envelope.content, 'base64'), pdf)
    }))

  check('exportInvoices (dl=1) returns the CSV the JSON envelope holds', () =>
    permitted(cred, 'invoices:download', async () => {
      const query = { invoiceType: 'periodic', orderBy: 'start_date_desc' }
      const blob = await cred.api.exportInvoices({ ...query, fileType: 'csv' })
      assert.ok(blob instanceof Blob && blob.type.startsWith('text/csv'))
      const csv = Buffer.from(await blob.arrayBuffer())
      const [header, ...rows] = csv.toString().trim().split('\n')
      assert.ok(header.startsWith('id,number,'))
      assert.deepEqual(
        rows.map((r) => r.split(',')[0]),
        invoices.filter((i) => i.type === 'periodic').map((i) => i.id),
      )

      const r = await rawGet(token, '/billing/v2beta1/export-invoices?invoice_type=periodic&order_by=start_date_desc')
      const envelope = await r.json()
      assert.equal(envelope.content_type, 'text/csv')
      assert.deepEqual(Buffer.from(envelope.content, 'base64'), csv)

      const paged = await cred.api.exportInvoices({ ...query, page: 2, pageSize: 3 })
      assert.equal((await paged.text()).trim().split('\n').length, 1 + 3)
    }))

  check('listDiscounts: one page, .all() and the async iterator agree', () =>
    permitted(cred, 'discounts:read', async () => {
      const first = await cred.api.listDiscounts({ orderBy: 'start_date_asc' })
      assert.ok(first.totalCount >= 2 && first.discounts.length === first.totalCount)
      const all = await cred.api.listDiscounts({ orderBy: 'start_date_asc', pageSize: 1 }).all()
      assert.deepEqual(all, first.discounts)
      assert.deepEqual((await pages(cred.api.listDiscounts({ orderBy: 'start_date_asc', pageSize: 1 }))).flat(), all)
      for (const d of all) {
        assert.equal(d.organizationId, ORGANIZATION_ID)
        assert.ok(Math.abs(d.valueRemaining - (d.value - d.valueUsed)) < 1e-9)
      }
      const rate = all.find((d) => d.mode === 'discount_mode_rate')
      assert.deepEqual(rate.filters, [{ exclude: false, type: 'category_name', value: 'Compute' }])
    }))

  check('redeemCoupon returns a Discount; an unknown code is ResourceNotFoundError', () =>
    permitted(cred, 'coupons:redeem', async () => {
      const code = `DEMO-SDK-JS-${mode.toUpperCase().replace(' ', '-')}`
      const d = await cred.api.redeemCoupon({ code })
      assert.equal(d.organizationId, ORGANIZATION_ID)
      assert.ok(d.description.includes(code) && d.coupon.description.includes(code))
      assert.ok(d.value > 0 && d.valueUsed === 0 && d.valueRemaining === d.value)
      assert.ok(d.startDate instanceof Date && d.startDate < d.stopDate)
      await assert.rejects(cred.api.redeemCoupon({ code: 'NO-SUCH-COUPON' }), Errors.ResourceNotFoundError)
    }))

  check('a bad argument is InvalidArgumentsError naming it', async () => {
    const err = await cred.api.listConsumptions({ pageSize: 101 }).catch((e) => e)
    assert.ok(err instanceof Errors.InvalidArgumentsError, String(err))
    assert.equal(err.status, 400)
    assert.deepEqual(
      err.details.map((d) => [d.argumentName, d.reason]),
      [['page_size', 'format']],
    )
  })

  check('naming another organization is PermissionsDeniedError', async () => {
    await assert.rejects(cred.api.listConsumptions({ organizationId: randomUUID() }), Errors.PermissionsDeniedError)
  })
}

describe('jwt: x-auth-token set by addAsyncHeaderInterceptor', () => {
  battery('jwt', (settings) => jwtClient(MANAGER, settings), MANAGER)
})

describe('gateway key: SCW_SECRET_KEY via configuration-loader', { skip: KEY ? false : KEY_MISSING }, () => {
  battery('gateway key', (settings) => keyClient(KEY, settings), KEY)
})

describe('refusals', () => {
  it('a read-only JWT (hand-written interceptor) is refused invoices with PermissionsDeniedError', async () => {
    await fixtures()
    const client = createClient({
      apiURL: URL_,
      interceptors: [
        {
          request: ({ request }) => {
            const r = request.clone()
            r.headers.set('x-auth-token', READ_ONLY)
            return r
          },
        },
      ],
    })
    const api = new Billingv2beta1.API(client)
    assert.ok((await api.listConsumptions({ pageSize: 1 })).totalCount > 0)
    const err = await api.listInvoices().catch((e) => e)
    assert.ok(err instanceof Errors.PermissionsDeniedError, String(err))
    assert.equal(err.status, 403)
    assert.deepEqual(err.list, [{ action: 'read', resource: 'invoices' }])
    await assert.rejects(api.listInvoices({ pageSize: 2 }).all(), Errors.PermissionsDeniedError)
    await assert.rejects(api.downloadInvoice({ invoiceId: closed.id }), Errors.PermissionsDeniedError)
    await assert.rejects(api.exportInvoices(), Errors.PermissionsDeniedError)
    await assert.rejects(api.listDiscounts(), Errors.PermissionsDeniedError)
    await assert.rejects(api.redeemCoupon({ code: 'DEMO-READER' }), Errors.PermissionsDeniedError)
  })

  it('unknown credentials are DeniedAuthenticationError', async () => {
    const forged = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl'
    const err = await new Billingv2beta1.API(jwtClient(forged)).listTaxes().catch((e) => e)
    assert.ok(err instanceof Errors.DeniedAuthenticationError, String(err))
    assert.equal(err.method, 'jwt')

    // An unknown key passes the SDK's own checks (it is a UUID) and is refused by the gateway.
    const client = createClient({ accessKey: DUMMY_ACCESS_KEY, secretKey: randomUUID(), apiURL: URL_ })
    const err2 = await new Billingv2beta1.API(client).listTaxes().catch((e) => e)
    assert.ok(err2 instanceof Errors.DeniedAuthenticationError, String(err2))
    assert.equal(err2.method, 'api_key')
  })

  it('the SDK itself refuses a JWT as secretKey, hence the interceptor', () => {
    assert.throws(
      () => createClient({ accessKey: DUMMY_ACCESS_KEY, secretKey: MANAGER, apiURL: URL_ }),
      /secret key/i,
    )
  })

  it('FinOps listCharges is not offered by this @scaleway/sdk-billing: cover it when a bump adds it', () => {
    assert.equal(typeof manager.listCharges, 'undefined')
    assert.deepEqual(Object.keys(Billingv2beta1).filter((k) => /finops|charge/i.test(k)), [])
  })
})
