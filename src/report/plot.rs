//! SVG plots of the report's figures: lines over categories (cold-start
//! time by origin) and grouped bars (bytes moved, sparsity). SVG text is
//! written as text elements, so no font library is needed.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// A plot that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {reason}")]
pub struct PlotError {
    pub path: PathBuf,
    pub reason: String,
}

/// One named series: a value per category (`None`: not measured).
pub type Series = (String, Vec<Option<f64>>);

const SIZE: (u32, u32) = (800, 460);

fn plot_error<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// The top of the y axis: a little above the largest value.
fn y_top(series: &[Series]) -> f64 {
    let max = series
        .iter()
        .flat_map(|(_, values)| values.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b));
    if max > 0.0 {
        max * 1.15
    } else {
        1.0
    }
}

/// The category under an x position, if the position is one's centre.
fn category_label(categories: &[String], x: f64) -> String {
    let index = x.round();
    if (x - index).abs() > 1e-6 || index < 0.0 {
        return String::new();
    }
    categories.get(index as usize).cloned().unwrap_or_default()
}

/// How a plot draws its series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A line per series over the categories.
    Lines,
    /// A group of bars per category, a bar per series.
    Bars,
}

/// Writes a line per series over `categories` (evenly spaced) to `path`.
pub fn lines(
    path: &Path,
    title: &str,
    categories: &[String],
    y_desc: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    plot(Shape::Lines, path, title, categories, y_desc, series)
}

/// Writes grouped bars, a group per category and a bar per series, to `path`.
pub fn bars(
    path: &Path,
    title: &str,
    categories: &[String],
    y_desc: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    plot(Shape::Bars, path, title, categories, y_desc, series)
}

fn plot(
    shape: Shape,
    path: &Path,
    title: &str,
    categories: &[String],
    y_desc: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let error = plot_error(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(&error)?;
    let n = categories.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..y_top(series))
        .map_err(&error)?;
    let mut mesh = chart.configure_mesh();
    if shape == Shape::Bars {
        mesh.disable_x_mesh();
    }
    mesh.x_labels(categories.len() + 1)
        .x_label_formatter(&|x| category_label(categories, *x))
        .y_desc(y_desc)
        .draw()
        .map_err(&error)?;
    // A group of bars spans 0.8 of a category; each bar an equal part of it.
    let bar_width = 0.8 / series.len().max(1) as f64;
    for (index, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        match shape {
            Shape::Lines => {
                let points: Vec<(f64, f64)> = values
                    .iter()
                    .enumerate()
                    .filter_map(|(x, v)| v.map(|v| (x as f64, v)))
                    .collect();
                chart
                    .draw_series(
                        points
                            .iter()
                            .map(|&point| Circle::new(point, 4, color.filled())),
                    )
                    .map_err(&error)?;
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(&error)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            Shape::Bars => {
                let offset = -0.4 + bar_width * index as f64;
                chart
                    .draw_series(values.iter().enumerate().filter_map(|(x, v)| {
                        let left = x as f64 + offset;
                        v.map(|v| {
                            Rectangle::new(
                                [(left, 0.0), (left + bar_width * 0.9, v)],
                                color.filled(),
                            )
                        })
                    }))
                    .map_err(&error)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(&error)?;
    root.present().map_err(&error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        let categories = vec!["0 ms".to_owned(), "10 ms".to_owned()];
        let series = vec![
            ("cold".to_owned(), vec![Some(0.5), Some(0.9)]),
            ("warm".to_owned(), vec![Some(0.2), None]),
        ];
        let line_path = dir.path().join("lines.svg");
        lines(&line_path, "start time", &categories, "seconds", &series).unwrap();
        let bar_path = dir.path().join("bars.svg");
        bars(&bar_path, "bytes", &categories, "MB", &series).unwrap();
        for path in [line_path, bar_path] {
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.starts_with("<svg"), "{svg:.100}");
            for label in ["10 ms", "cold", "warm"] {
                assert!(svg.contains(label), "{} lacks {label}", path.display());
            }
        }
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let path = Path::new("/nonexistent-dir/x.svg");
        let err = lines(path, "t", &["a".into()], "y", &[]).unwrap_err();
        assert_eq!(err.path, path);
    }
}
