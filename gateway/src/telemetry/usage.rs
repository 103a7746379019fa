//! Tokens used by model and tenant, and what they would cost at the
//! configured prices (`[prices."<model>"]`, US dollars per million tokens).

use std::sync::Arc;

use super::metrics::{COST, TOKENS};
pub use crate::config::components::{Price, Prices};

impl Price {
    /// Dollars for `input` and `output` tokens.
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_per_million + output as f64 * self.output_per_million) / 1e6
    }
}

/// Who used tokens of which model, and its price: settled once per request.
#[derive(Debug, Clone)]
pub struct Meter {
    pub model: String,
    pub tenant: Arc<str>,
    pub price: Option<Price>,
}

impl Meter {
    /// A call to `model` (the name sent) that `resolved` answered (an
    /// alias's variant model, or the same name): priced by the name sent,
    /// else by the model that answered, so calling a priced model through
    /// an alias, or an alias's model directly, is never free.
    pub fn new(prices: &Prices, model: &str, resolved: &str, tenant: Arc<str>) -> Self {
        let price = prices.get(model).or_else(|| prices.get(resolved)).copied();
        Self { model: model.to_owned(), tenant, price }
    }

    /// Count tokens a model read (`input`) and wrote (`output`).
    pub fn record(&self, input: u64, output: u64) {
        let (model, tenant) = (self.model.clone(), self.tenant.to_string());
        for (kind, n) in [("input", input), ("output", output)] {
            if n > 0 {
                metrics::counter!(TOKENS, "model" => model.clone(), "tenant" => tenant.clone(), "kind" => kind)
                    .increment(n);
            }
        }
        if let Some(price) = self.price {
            // A running total in dollars: a gauge, as counters count integers.
            metrics::gauge!(COST, "model" => model, "tenant" => tenant).increment(price.cost(input, output));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_per_million_tokens_of_each_kind() {
        let p = Price { input_per_million: 0.15, output_per_million: 0.6 };
        assert!((p.cost(1_000_000, 0) - 0.15).abs() < 1e-12);
        assert!((p.cost(2_000, 500) - (0.0003 + 0.0003)).abs() < 1e-12);
        assert_eq!(Price::default().cost(10, 10), 0.0);
    }

    #[test]
    fn a_call_is_priced_by_the_name_sent_else_by_the_model_that_answered() {
        let p = |input: f64| Price { input_per_million: input, output_per_million: 0.0 };
        let prices: Prices = [("chat".to_owned(), p(1.0)), ("echo".to_owned(), p(2.0))].into_iter().collect();
        let price = |sent: &str, resolved: &str| Meter::new(&prices, sent, resolved, Arc::from("t")).price;
        assert_eq!(price("chat", "echo"), Some(p(1.0)), "the alias's own price first");
        assert_eq!(price("alias", "echo"), Some(p(2.0)), "an unpriced alias of a priced model");
        assert_eq!(price("nothing", "none"), None);
    }

    #[test]
    fn negative_or_nan_prices_are_refused() {
        let mut prices = Prices::new();
        prices.insert("m".into(), Price { input_per_million: 1.0, output_per_million: 2.0 });
        assert!(crate::config::components::check_prices(&prices).is_ok());
        prices.insert("bad".into(), Price { input_per_million: -1.0, output_per_million: 0.0 });
        assert_eq!(crate::config::components::check_prices(&prices).unwrap_err().0, "prices.\"bad\".input_per_million");
    }
}
