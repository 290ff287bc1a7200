//! The live loss chart: an SVG line of the loss per step, with its
//! exponential moving average and labelled axes.

use leptos::prelude::*;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 32.0;
const TOP: f64 = 12.0;
const RIGHT: f64 = 12.0;

fn points(values: &[(u64, f32)], x: &dyn Fn(u64) -> f64, y: &dyn Fn(f32) -> f64) -> String {
    values.iter().map(|&(s, l)| format!("{:.1},{:.1}", x(s), y(l))).collect::<Vec<_>>().join(" ")
}

#[component]
pub fn LossChart(losses: RwSignal<Vec<(u64, f32)>>) -> impl IntoView {
    let drawing = move || {
        let values: Vec<(u64, f32)> = losses.get().into_iter().filter(|(_, l)| l.is_finite()).collect();
        if values.is_empty() {
            return view! { <text x=WIDTH / 2.0 y=HEIGHT / 2.0 text-anchor="middle" class="empty">"the loss appears here while training"</text> }.into_any();
        }
        let first = values.first().map(|v| v.0).unwrap_or(0);
        let last = values.last().map(|v| v.0).unwrap_or(1).max(first + 1);
        // The data's own range with a margin: losses move little around a large value.
        let min = values.iter().map(|v| v.1).fold(f32::INFINITY, f32::min);
        let max = values.iter().map(|v| v.1).fold(f32::NEG_INFINITY, f32::max);
        let margin = ((max - min) * 0.08).max(max.abs() * 0.002).max(1e-6);
        let (low, high) = (min - margin, max + margin);
        let x = move |s: u64| LEFT + (s - first) as f64 / (last - first) as f64 * (WIDTH - LEFT - RIGHT);
        let y = move |l: f32| TOP + (1.0 - ((l - low) / (high - low)) as f64) * (HEIGHT - TOP - BOTTOM);
        let mut smooth = Vec::with_capacity(values.len());
        let mut average = values[0].1;
        for &(s, l) in &values {
            average = 0.9 * average + 0.1 * l;
            smooth.push((s, average));
        }
        let raw = points(&values, &x, &y);
        let smooth = points(&smooth, &x, &y);
        view! {
            <line x1=LEFT y1=HEIGHT - BOTTOM x2=WIDTH - RIGHT y2=HEIGHT - BOTTOM class="axis" />
            <line x1=LEFT y1=TOP x2=LEFT y2=HEIGHT - BOTTOM class="axis" />
            <text x=LEFT - 6.0 y=TOP + 4.0 text-anchor="end" class="tick">{format!("{high:.4}")}</text>
            <text x=LEFT - 6.0 y=HEIGHT - BOTTOM text-anchor="end" class="tick">{format!("{low:.4}")}</text>
            <text x=LEFT y=HEIGHT - BOTTOM + 16.0 text-anchor="start" class="tick">{first.to_string()}</text>
            <text x=WIDTH - RIGHT y=HEIGHT - BOTTOM + 16.0 text-anchor="end" class="tick">{last.to_string()}</text>
            <text x=(LEFT + WIDTH) / 2.0 y=HEIGHT - 4.0 text-anchor="middle" class="label">"step"</text>
            <text x=14.0 y=(TOP + HEIGHT - BOTTOM) / 2.0 text-anchor="middle" class="label" transform=format!("rotate(-90 14 {})", (TOP + HEIGHT - BOTTOM) / 2.0)>"loss"</text>
            <polyline points=raw class="raw" />
            <polyline points=smooth class="smooth" />
            {(values.len() <= 30).then(|| values.iter().map(|&(s, l)| view! { <circle cx=x(s) cy=y(l) r=3.0 class="dot" /> }).collect_view())}
        }
        .into_any()
    };
    view! {
        <svg id="loss-chart" class="chart" viewBox=format!("0 0 {WIDTH} {HEIGHT}") data-points=move || losses.get().len()
            data-losses=move || serde_json::to_string(&losses.get()).unwrap_or_default()>
            {drawing}
        </svg>
    }
}
