//! Clock sync core (placeholder: being written).
