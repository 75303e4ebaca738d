//! mDNS discovery (placeholder: being written).
