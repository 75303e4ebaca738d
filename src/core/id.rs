//! Node ids: 16 lowercase hex characters (64 random bits, made once per box).

/// True when `s` is a node id: exactly 16 characters of `0-9a-f`.
pub fn is_node_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::is_node_id;

    #[test]
    fn ids() {
        assert!(is_node_id("0123456789abcdef"));
        assert!(!is_node_id("0123456789ABCDEF"));
        assert!(!is_node_id("0123456789abcde"));
        assert!(!is_node_id("0123456789abcdeg"));
        assert!(!is_node_id(""));
    }
}
