//! User-space network impairment (placeholder: being written).
