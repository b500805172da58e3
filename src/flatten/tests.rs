//! Properties of the flattener that need no kernel: within a layer, the
//! order of entries other than file data does not change a byte of the
//! image, the same input always gives the same image, and the chunks handed
//! on while it is made are that image's chunks.

use std::collections::BTreeMap;
use std::io::{self, Cursor, Read};

use proptest::prelude::*;

use super::{
    ChunkConsumer, ChunkSink, FileSink, FlattenOptions, FlattenReport, Flattener, ImageSink,
};
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

fn build<S: ImageSink>(layers: &[Vec<(LayerEntry, Vec<u8>)>], sink: S) -> FlattenReport {
    let mut f = Flattener::with_sink(sink, FlattenOptions { free_space: 0 });
    for (i, layer) in layers.iter().enumerate() {
        f.begin_layer(&format!("{i}")).expect("begin");
        for (e, data) in layer {
            f.apply(e.clone(), &mut &data[..]).expect("apply");
        }
        f.end_layer().expect("end");
    }
    f.finish().expect("finish")
}

/// The image of `layers`, built twice to a file and once more, for each
/// chunk size, as chunks handed on while it is made: all must agree.
fn flatten(layers: &[Vec<(LayerEntry, Vec<u8>)>]) -> Vec<u8> {
    let report = build(
        layers,
        FileSink::new(Cursor::new(Vec::new())).expect("empty"),
    );
    assert!(report.image_size > 0);
    let mut out = Vec::new();
    let again = build(layers, FileSink::new(Cursor::new(&mut out)).expect("empty"));
    assert_eq!(report, again, "the same input gives the same image");
    for chunk_size in [64 << 10, 512 << 10] {
        let mut collect = Collect::new(chunk_size);
        let streamed = build(layers, ChunkSink::new(&mut collect).expect("chunk size"));
        assert_eq!(streamed.digest, None);
        assert_eq!(
            FlattenReport {
                digest: report.digest.clone(),
                ..streamed
            },
            report
        );
        assert_eq!(collect.size, Some(out.len() as u64));
        for (index, expected) in out.chunks(chunk_size as usize).enumerate() {
            match collect.chunks.get(&(index as u64)) {
                Some(chunk) => assert!(chunk == expected, "chunk {index} differs"),
                None => assert!(expected.iter().all(|&b| b == 0), "chunk {index} missing"),
            }
        }
    }
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

/// An image past one group, in data and in inodes, with free space after:
/// streamed chunks still match the file, across group boundaries and the
/// metadata held back for each group.
#[test]
fn chunks_match_the_file_across_groups() {
    fn build_big<S: ImageSink>(sink: S) -> FlattenReport {
        let meta = EntryMeta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: Timestamp { secs: 1, nanos: 0 },
            xattrs: Vec::new(),
        };
        let path = |p: String| EntryPath::parse(p.as_bytes()).expect("valid");
        let mut f = Flattener::with_sink(
            sink,
            FlattenOptions {
                free_space: 300 << 20,
            },
        );
        f.begin_layer("base").unwrap();
        let big = 130u64 << 20;
        let regular = |size| EntryKind::Regular { size };
        f.apply(
            LayerEntry {
                path: path("big".into()),
                kind: regular(big),
                meta: meta.clone(),
            },
            &mut io::repeat(0x5a).take(big),
        )
        .unwrap();
        for i in 0..9000 {
            let entry = LayerEntry {
                path: path(format!("many/f{i}")),
                kind: regular(5),
                meta: meta.clone(),
            };
            f.apply(entry, &mut &b"hello"[..]).unwrap();
        }
        f.end_layer().unwrap();
        f.begin_layer("top").unwrap();
        let entry = LayerEntry {
            path: path("many/f1".into()),
            kind: EntryKind::Whiteout,
            meta,
        };
        f.apply(entry, &mut io::empty()).unwrap();
        f.finish().unwrap()
    }

    let file = tempfile::tempfile().unwrap();
    let report = build_big(FileSink::new(&file).unwrap());
    let mut collect = Collect::new(512 << 10);
    let streamed = build_big(ChunkSink::new(&mut collect).unwrap());
    assert!(report.image_size > 3 * (128 << 20), "{report:?}");
    assert!(report.files > 9000);
    assert_eq!(streamed.image_size, report.image_size);
    assert_eq!(collect.size, Some(report.image_size));
    let mut buf = vec![0u8; 512 << 10];
    for index in 0..report.image_size.div_ceil(512 << 10) {
        let at = index * (512 << 10);
        let expected = &mut buf[..(report.image_size - at).min(512 << 10) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, expected, at).unwrap();
        match collect.chunks.get(&index) {
            Some(chunk) => assert!(chunk[..] == expected[..], "chunk {index} differs"),
            None => assert!(expected.iter().all(|&b| b == 0), "chunk {index} missing"),
        }
    }
}

/// Collects the chunks a sink hands on, checking each comes once.
#[derive(Default)]
pub(super) struct Collect {
    chunk_size: u64,
    pub(super) chunks: BTreeMap<u64, Vec<u8>>,
    pub(super) size: Option<u64>,
}

impl Collect {
    pub(super) fn new(chunk_size: u64) -> Collect {
        Collect {
            chunk_size,
            ..Collect::default()
        }
    }
}

impl ChunkConsumer for &mut Collect {
    type Chunk = Vec<u8>;
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
    fn take(&mut self) -> Vec<u8> {
        vec![0xa5; self.chunk_size as usize]
    }
    fn put(&mut self, index: u64, mut chunk: Vec<u8>, len: usize) -> io::Result<()> {
        chunk.truncate(len);
        assert!(self.size.is_none(), "a chunk after the end");
        assert!(
            self.chunks.insert(index, chunk).is_none(),
            "chunk {index} twice"
        );
        Ok(())
    }
    fn finish(self, image_size: u64) -> io::Result<()> {
        self.size = Some(image_size);
        Ok(())
    }
}
