//! The audio callback never allocates: every buffer, clicks, log events and snapshot
//! updates included, runs under `assert_no_alloc`.

mod common;
use assert_no_alloc::{assert_no_alloc, violation_count, AllocDisabler};
use common::*;

#[global_allocator]
static A: AllocDisabler = AllocDisabler;

#[test]
fn render_never_allocates() {
    // The detector works: an allocation inside is counted.
    let before = violation_count();
    assert_no_alloc(|| {
        let v: Vec<u8> = Vec::with_capacity(16);
        std::hint::black_box(v);
    });
    assert!(
        violation_count() > before,
        "the allocation detector must see allocations"
    );

    let before = violation_count();
    let mut rig = Rig::new(snapshot(1_000_000_000, 400.0, 7), 256, 900_000_000);
    let mut buf = vec![0f32; 256];
    let mut clicks = 0;
    for i in 0..(48_000 * 10 / 256) {
        if i % 50 == 0 {
            // a writer publishing concurrently in spirit: the read path must not allocate
            let s = snapshot(1_000_000_000, 120.0 + (i % 7) as f64, 4);
            rig.cell.write(&s);
        }
        let m = rig.frame_time(rig.k * 256) + (i as i64 % 13) * 10_000;
        rig.k += 1;
        assert_no_alloc(|| rig.renderer.render(&mut buf[..], m));
        clicks += rig.drain().len();
    }
    assert!(
        clicks >= 19,
        "the test must actually render clicks ({clicks})"
    );
    assert_eq!(violation_count(), before, "the audio callback allocated");
}
