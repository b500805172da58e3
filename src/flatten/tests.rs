//! Properties of the flattener that need no kernel: within a layer, the
//! order of entries other than file data does not change a byte of the
//! image, and the same input always gives the same image.

use std::io::Cursor;

use proptest::prelude::*;

use super::{FlattenOptions, Flattener};
use crate::oci::entry::{EntryKind, EntryMeta, EntryPath, LayerEntry, Timestamp};

const DIRS: [&str; 4] = ["d0", "d0/d1", "d2", "d2/d3/d4"];

#[derive(Debug, Clone)]
enum Op {
    Dir(usize, u32),
    File(usize, usize, u8, usize),
    Symlink(usize, usize, usize),
    Fifo(usize, usize),
    WhiteoutDir(usize),
    WhiteoutFile(usize, usize),
    Opaque(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize, 0..0o1000u32).prop_map(|(d, m)| Op::Dir(d, m)),
        (0..4usize, 0..4usize, any::<u8>(), 0..3usize)
            .prop_map(|(d, f, b, s)| Op::File(d, f, b, s)),
        (0..4usize, 0..4usize, 0..2usize).prop_map(|(d, f, l)| Op::Symlink(d, f, l)),
        (0..4usize, 0..4usize).prop_map(|(d, f)| Op::Fifo(d, f)),
        (0..4usize).prop_map(Op::WhiteoutDir),
        (0..4usize, 0..4usize).prop_map(|(d, f)| Op::WhiteoutFile(d, f)),
        (0..4usize).prop_map(Op::Opaque),
    ]
}

fn entry(op: &Op, layer: usize) -> (LayerEntry, Vec<u8>) {
    let meta = EntryMeta {
        mode: 0o644,
        uid: layer as u32,
        gid: 0,
        mtime: Timestamp {
            secs: layer as i64,
            nanos: 7,
        },
        xattrs: Vec::new(),
    };
    let at = |d: usize, f: usize| {
        EntryPath::parse(format!("{}/f{f}", DIRS[d]).as_bytes()).expect("valid")
    };
    let dir = |d: usize| EntryPath::parse(DIRS[d].as_bytes()).expect("valid");
    let (path, kind, data) = match *op {
        Op::Dir(d, m) => {
            return (
                LayerEntry {
                    path: dir(d),
                    kind: EntryKind::Directory,
                    meta: EntryMeta { mode: m, ..meta },
                },
                Vec::new(),
            )
        }
        Op::File(d, f, b, s) => {
            let data = match s {
                0 => Vec::new(),
                1 => vec![b; 100],
                _ => [vec![b | 1; 5000], vec![0; 8192], vec![b; 10]].concat(),
            };
            (
                at(d, f),
                EntryKind::Regular {
                    size: data.len() as u64,
                },
                data,
            )
        }
        Op::Symlink(d, f, l) => (
            at(d, f),
            EntryKind::Symlink {
                target: vec![b'x'; [10, 100][l]],
            },
            Vec::new(),
        ),
        Op::Fifo(d, f) => (at(d, f), EntryKind::Fifo, Vec::new()),
        Op::WhiteoutDir(d) => (dir(d), EntryKind::Whiteout, Vec::new()),
        Op::WhiteoutFile(d, f) => (at(d, f), EntryKind::Whiteout, Vec::new()),
        Op::Opaque(d) => (dir(d), EntryKind::OpaqueDirectory, Vec::new()),
    };
    (LayerEntry { path, kind, meta }, data)
}

/// The layers as entries, each path at most once per layer.
fn layers(ops: &[Vec<Op>]) -> Vec<Vec<(LayerEntry, Vec<u8>)>> {
    ops.iter()
        .enumerate()
        .map(|(i, layer)| {
            let mut seen = std::collections::HashSet::new();
            layer
                .iter()
                .map(|o| entry(o, i + 1))
                .filter(|(e, _)| {
                    seen.insert((
                        e.path.clone(),
                        matches!(e.kind, EntryKind::Whiteout | EntryKind::OpaqueDirectory),
                    ))
                })
                .collect()
        })
        .collect()
}

fn flatten(layers: &[Vec<(LayerEntry, Vec<u8>)>]) -> Vec<u8> {
    let mut f = Flattener::new(Cursor::new(Vec::new()), FlattenOptions { free_space: 0 })
        .expect("empty output");
    for (i, layer) in layers.iter().enumerate() {
        f.begin_layer(&format!("{i}")).expect("begin");
        for (e, data) in layer {
            f.apply(e.clone(), &mut &data[..]).expect("apply");
        }
        f.end_layer().expect("end");
    }
    let report = f.finish().expect("finish");
    assert!(report.image_size > 0);
    let mut out = Vec::new();
    let mut f2 = Flattener::new(Cursor::new(&mut out), FlattenOptions { free_space: 0 })
        .expect("empty output");
    for (i, layer) in layers.iter().enumerate() {
        f2.begin_layer(&format!("{i}")).expect("begin");
        for (e, data) in layer {
            f2.apply(e.clone(), &mut &data[..]).expect("apply");
        }
        f2.end_layer().expect("end");
    }
    let again = f2.finish().expect("finish");
    assert_eq!(report, again, "the same input gives the same image");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn only_file_data_order_matters_within_a_layer(
        ops in prop::collection::vec(prop::collection::vec(op(), 0..24), 1..4),
        seed in any::<u64>(),
    ) {
        let original = layers(&ops);
        let mut shuffled = original.clone();
        let mut state = seed | 1;
        for layer in &mut shuffled {
            let (data, mut others): (Vec<_>, Vec<_>) = layer.drain(..).partition(|(e, _)| matches!(e.kind, EntryKind::Regular { .. }));
            for i in (1..others.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                others.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut data = data.into_iter();
            for other in others {
                if state & 1 == 1 {
                    layer.extend(data.next());
                }
                state = state.rotate_right(1);
                layer.push(other);
            }
            layer.extend(data);
        }
        prop_assert!(flatten(&original) == flatten(&shuffled));
    }
}
