//! A reducer written in Rust, run with every nats-projector command.
//!
//! `order_totals` keeps, per order, the number of lines and the total in cents, from
//! `order.line_added` events (`{"order_id", "sku", "qty", "price_cents"}`); `order.cancelled`
//! deletes the order. Run it like the stock binary:
//!
//! ```sh
//! cargo run --example custom_reducer -- run --config examples/custom_reducer.toml
//! ```

use std::process::ExitCode;

use nats_projector::decode::Event;
use nats_projector::{Change, Projection, ReduceError, Reducers};
use serde_json::{Value, json};

/// Order totals. Deterministic and free of I/O, as every reducer must be.
struct OrderTotals;

impl Projection for OrderTotals {
    fn apply(&self, state: Option<Value>, event: &Event) -> Result<Change, ReduceError> {
        let lines = state
            .as_ref()
            .and_then(|s| s["lines"].as_u64())
            .unwrap_or(0);
        let total = state
            .as_ref()
            .and_then(|s| s["total_cents"].as_u64())
            .unwrap_or(0);
        match event.event_type.as_str() {
            "order.line_added" => {
                let qty = event.data["qty"].as_u64();
                let price = event.data["price_cents"].as_u64();
                let (Some(qty), Some(price)) = (qty, price) else {
                    // Refused events go to the DLQ with `reducer_error` and this reason.
                    return Err(ReduceError(
                        "qty and price_cents must be unsigned integers".into(),
                    ));
                };
                let line = qty
                    .checked_mul(price)
                    .ok_or(ReduceError("line total overflows".into()))?;
                Ok(Change::Put(
                    json!({"lines": lines + 1, "total_cents": total + line}),
                ))
            }
            "order.cancelled" => Ok(Change::Delete),
            // Other event types leave the state as it is.
            _ => Ok(Change::Put(
                state.unwrap_or_else(|| json!({"lines": 0, "total_cents": 0})),
            )),
        }
    }
}

fn main() -> ExitCode {
    nats_projector::cli::main_with(Reducers::new().with("order_totals", OrderTotals))
}
