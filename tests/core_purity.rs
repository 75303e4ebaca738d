//! The core is pure: nothing under `src/core/` reads a clock, touches a socket or a file,
//! reads the environment, spawns, locks across threads, or draws unseeded randomness.
//! This test reads the sources and fails naming the file, line and forbidden use.
//! (Comments are skipped; `::core::net` address types are data, not sockets.)

use std::path::{Path, PathBuf};

/// (pattern, why it is forbidden)
const FORBIDDEN: &[(&str, &str)] = &[
    ("Instant::now", "reads a clock"),
    ("SystemTime", "reads the wall clock"),
    ("UNIX_EPOCH", "reads the wall clock"),
    ("tokio", "async runtime / IO"),
    ("std::net", "sockets"),
    ("UdpSocket", "sockets"),
    ("TcpStream", "sockets"),
    ("quinn", "sockets"),
    ("mdns_sd", "sockets"),
    ("std::fs", "file system"),
    ("File::", "file system"),
    ("std::env", "environment"),
    ("env!(", "environment"),
    ("libc", "system calls"),
    ("std::thread", "threads"),
    ("thread::spawn", "threads"),
    ("std::process", "processes"),
    ("getrandom", "unseeded randomness"),
    ("rand::", "unseeded randomness"),
    ("thread_rng", "unseeded randomness"),
    (
        "RandomState",
        "unseeded randomness (HashMap's default hasher)",
    ),
    (
        "HashMap",
        "iteration order from an unseeded hasher (use BTreeMap)",
    ),
    (
        "HashSet",
        "iteration order from an unseeded hasher (use BTreeSet)",
    ),
    ("println!", "writes to stdout"),
    ("eprintln!", "writes to stderr"),
    ("std::io::stdin", "reads stdin"),
    ("Mutex", "locks across threads"),
    ("static mut", "global state"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a line: without a `//` comment (outside string literals, roughly).
fn code(line: &str) -> &str {
    let t = line.trim_start();
    if t.starts_with("//") {
        return "";
    }
    match line.find("//") {
        Some(i) if line[..i].matches('"').count() % 2 == 0 => &line[..i],
        _ => line,
    }
}

/// Every forbidden use in `src`, as `file:line: pattern (why)`.
fn violations(src: &str, name: &str) -> Vec<String> {
    let mut v = Vec::new();
    for (n, line) in src.lines().enumerate() {
        let c = code(line);
        for (pat, why) in FORBIDDEN {
            if c.contains(pat) {
                v.push(format!(
                    "{name}:{}: `{pat}` ({why}): {}",
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    v
}

#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() >= 8,
        "src/core holds the core modules: {files:?}"
    );
    let mut all = Vec::new();
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        all.extend(violations(&src, &f.display().to_string()));
    }
    assert!(
        all.is_empty(),
        "the core must stay pure (see src/core/mod.rs):\n{}",
        all.join("\n")
    );
}

#[test]
fn the_checker_catches_what_it_forbids() {
    // The check itself could rot into one that passes everything.
    let bad = "fn f() {\n    let t = std::time::Instant::now();\n    let s = tokio::net::UdpSocket::bind(\"x\");\n}\n";
    let v = violations(bad, "x.rs");
    assert!(
        v.iter()
            .any(|l| l.contains("x.rs:2") && l.contains("Instant::now")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|l| l.contains("x.rs:3") && l.contains("tokio")),
        "{v:?}"
    );
    // ...and ignores comments.
    assert!(violations("// Instant::now() is forbidden\n", "y.rs").is_empty());
}

/// What the web layer may take from `net`: the room handle and counters (and the
/// DNS label of the box's name).
const WEB_MAY_USE: &[&str] = &[
    "handle",
    "RoomHandle",
    "MeshStats",
    "LinkStats",
    "discovery::dns_label",
];

#[test]
fn no_cycles_between_folders() {
    // Layers, lowest first: a folder may use only folders to its left (and itself).
    // `web` reaches the room through `net::handle` only.
    const ORDER: &[&str] = &[
        "core", "sys", "audio", "mirror", "net", "web", "node", "cli",
    ];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = Vec::new();
    for (i, layer) in ORDER.iter().enumerate() {
        let mut files = Vec::new();
        let dir = src.join(layer);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else if src.join(format!("{layer}.rs")).exists() {
            files.push(src.join(format!("{layer}.rs")));
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                let c = code(line);
                for upper in &ORDER[i + 1..] {
                    if c.contains(&format!("crate::{upper}::"))
                        || c.contains(&format!("crate::{upper}}}"))
                    {
                        bad.push(format!("{}:{}: {layer} uses {upper}", f.display(), n + 1));
                    }
                }
                if *layer == "web" {
                    if let Some(rest) = c.split("crate::net::").nth(1) {
                        let rest = rest.split(';').next().unwrap_or("");
                        let items = rest.trim_matches(|ch| ch == '{' || ch == '}' || ch == ' ');
                        for item in items.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                            if !WEB_MAY_USE.iter().any(|ok| item.starts_with(ok)) {
                                bad.push(format!(
                                    "{}:{}: web reaches into net beyond its handle: {item}",
                                    f.display(),
                                    n + 1
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}
