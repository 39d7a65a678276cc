//! The Flex CPU backend's fast paths (compiled with the `flex` feature): each is reached only
//! through the backend-generic function of the same name one level up, which falls back to Burn's
//! operations wherever the fast path does not apply. Every kernel here is tested against that
//! fallback (values and, where it has a backward pass, gradients).

pub(crate) mod adamw;
pub(crate) mod attention;
pub(crate) mod bf16_dot;
pub(crate) mod dense;
pub(crate) mod flex;
pub(crate) mod fused;
pub(crate) mod half_weight;
pub(crate) mod loss;
pub(crate) mod norm;
pub(crate) mod quant;
pub(crate) mod skinny;
