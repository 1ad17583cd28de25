// A web app's client of billing-gateway, typed by the types openapi-typescript generates from
// the gateway's OpenAPI document (./check.sh writes them to generated/gateway.d.ts). Nothing
// here is typed by hand: a field the document does not describe does not compile.
import type { components, paths } from "./generated/gateway";

type Schemas = components["schemas"];
type Consumptions = paths["/billing/v2beta1/consumptions"]["get"];
/** The query `consumptions` takes, with each parameter's documented type. */
export type ConsumptionsQuery = NonNullable<Consumptions["parameters"]["query"]>;
export type ConsumptionsPage = Consumptions["responses"][200]["content"]["application/json"];
/** `GET /gateway/v1/costs` (contract §12). */
export type Costs = Schemas["Costs"];
export type Money = Schemas["Money"];
/** Every error of the gateway and of the Billing API: Scaleway-shaped. */
export type GatewayError = Schemas["Error"];

/** Thrown for any answer that is not a success, with the gateway's Scaleway-shaped body. */
export class GatewayFailure extends Error {
  constructor(
    readonly status: number,
    readonly body: GatewayError,
  ) {
    super(`${status} ${body.type}: ${body.message}`);
  }
}

/** A gateway at `base` (no trailing slash), called with the user's IdP token. */
export class Gateway {
  constructor(
    private readonly base: string,
    private readonly token: () => Promise<string>,
  ) {}

  private async get<T>(path: string, query: Record<string, string | number | undefined> = {}): Promise<T> {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(query)) {
      if (value !== undefined) params.append(name, String(value));
    }
    const response = await fetch(`${this.base}${path}?${params}`, {
      headers: { Authorization: `Bearer ${await this.token()}` },
    });
    if (!response.ok) throw new GatewayFailure(response.status, (await response.json()) as GatewayError);
    return (await response.json()) as T;
  }

  /** The caller's costs for a period (default: the current one), scoped by its grants. */
  costs(billing_period?: string): Promise<Costs> {
    return this.get<Costs>("/gateway/v1/costs", { billing_period });
  }

  /** One page of consumption lines. */
  consumptions(query: ConsumptionsQuery = {}): Promise<ConsumptionsPage> {
    return this.get<ConsumptionsPage>("/billing/v2beta1/consumptions", query);
  }

  /** Every consumption line of a period, page after page until a short one. */
  async allConsumptions(billing_period: string): Promise<ConsumptionsPage["consumptions"]> {
    const lines: ConsumptionsPage["consumptions"] = [];
    for (let page = 1; ; page++) {
      const answer = await this.consumptions({ billing_period, page, page_size: 100 });
      lines.push(...answer.consumptions);
      if (answer.consumptions.length < 100) return lines;
    }
  }
}

/** Money as cents, exactly: `units` and `nanos` carry the same sign. */
export function cents(money: Money): bigint {
  return BigInt(money.units) * 100n + BigInt(Math.trunc(money.nanos / 10_000_000));
}

/** What a costs page shows: each project's month to date against its budget. */
export function summary(costs: Costs): string[] {
  return costs.projects.map((project) => {
    const name = project.project_name ?? project.project_id;
    const used = project.budget ? ` (${Math.round(project.budget.used_ratio * 100)} % of budget)` : "";
    return `${name}: ${cents(project.total)} cents ${project.total.currency_code}${used}`;
  });
}

/** The month's consumption by category, from the lines. */
export function byCategory(lines: ConsumptionsPage["consumptions"]): Map<string, bigint> {
  const totals = new Map<string, bigint>();
  for (const line of lines) {
    totals.set(line.category_name, (totals.get(line.category_name) ?? 0n) + cents(line.value));
  }
  return totals;
}
