//! The Billing API as data, with no I/O: the permissions, the operation table (the only place
//! that knows a Billing path, a parameter, a scope rule, a period parameter, what is audited or
//! which operations serve files), the validated [`Call`] a request becomes, and the OpenAPI
//! document generated from the table.

mod call;
mod operations;
mod query;

pub use call::{Call, parse};
#[cfg(test)]
pub(crate) use operations::by_name;
pub use operations::{
    Audit, Download, Kind, Method, OPERATIONS, Operation, OrgRule, Param, Permission, Permissions,
    Scope,
};
pub use query::parse_timestamp;
