use super::*;

fn id(n: u8) -> ChunkId {
    ChunkId([n; 32])
}

/// An image whose chunks have the ids `ids` (0 stands for a zero chunk).
fn image(name: &str, ids: &[u8]) -> Image {
    Image {
        name: name.to_owned(),
        chunk_ids: ids.iter().map(|&n| (n != 0).then(|| id(n))).collect(),
    }
}

#[test]
fn each_push_uploads_what_no_earlier_push_stored() {
    let base = image("base", &[1, 2, 3, 0, 0]);
    let series = [
        // Shares 1 and 2 with the base; 4 and 5 are new.
        image("v1", &[1, 2, 4, 5, 0]),
        // Rebuilt as it was.
        image("v2", &[1, 2, 4, 5, 0]),
        // A repeated chunk counts once; 6 is new.
        image("v3", &[1, 6, 6, 5, 0]),
        image("v4", &[1, 2, 4, 5, 0]),
    ];
    let dedup = dedup(&[base], &series);
    let added: Vec<(u64, u64)> = dedup
        .pushes
        .iter()
        .map(|p| (p.chunks_distinct, p.chunks_new))
        .collect();
    assert_eq!(added, [(4, 2), (4, 0), (3, 1), (4, 0)]);
    assert_eq!(dedup.zero_new_percent, 50.0);
    // 50%, 0%, 33.3%, 0%.
    assert!((dedup.mean_new_percent - (50.0 + 100.0 / 3.0) / 4.0).abs() < 1e-9);
    assert!((dedup.median_new_percent - 50.0 / 3.0).abs() < 1e-9);
}

#[test]
fn an_empty_series_has_no_figures_rather_than_nan() {
    let dedup = dedup(&[], &[]);
    assert_eq!(
        (
            dedup.zero_new_percent,
            dedup.mean_new_percent,
            dedup.median_new_percent
        ),
        (0.0, 0.0, 0.0)
    );
}

#[test]
fn sharing_counts_the_base_chunks_each_image_holds() {
    let base = image("base", &[1, 2, 3, 4, 0]);
    let shares = sharing(
        &base,
        &[
            image("app", &[1, 2, 3, 9, 9]),
            image("other", &[7, 8, 0, 0, 0]),
        ],
    );
    assert_eq!(
        (
            shares[0].base_chunks,
            shares[0].reused,
            shares[0].image_chunks
        ),
        (4, 3, 4)
    );
    assert_eq!(shares[0].percent_of_base(), 75.0);
    assert_eq!(shares[0].percent_of_image(), 75.0);
    assert_eq!(shares[1].reused, 0);
    assert_eq!(shares[1].percent_of_base(), 0.0);
}
