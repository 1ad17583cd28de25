//! The Billing API as data, with no I/O: the permissions, the operation table (the only place
//! that knows a Billing path, a parameter, a scope rule or a period parameter), the validated
//! [`Call`] a request becomes, and the OpenAPI document generated from the table.

mod call;
pub mod openapi;
mod operations;

pub use call::{Call, parse, parse_timestamp};
pub use operations::{
    Kind, Method, OPERATIONS, Operation, OrgRule, Param, Permission, Permissions, by_name,
};
