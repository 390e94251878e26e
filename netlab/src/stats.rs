//! Reading the Prometheus text the proxies serve on `/stats/prometheus` (ztunnel's and the
//! waypoint's tests, through [`crate::http_get_in`] or their own client).

/// The value of `name` summed over its series whose labels include every `(key, value)` of
/// `labels` (none: every series of `name`). Comment lines are skipped; a value is read as a
/// number and truncated to a whole count; a series of another name that `name` prefixes
/// (`x_total` for `x`) does not count.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.trim_end().rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            // A label matches at a boundary (`{k=` or `,k=`): `workload` is not the tail
            // of `source_workload`.
            labels
                .iter()
                .all(|(k, v)| {
                    let pair = format!("{k}=\"{v}\"");
                    rest.starts_with(&pair) || rest.contains(&format!(",{pair}"))
                })
                .then(|| value.parse::<f64>().ok())
                .flatten()
                .map(|v| v as u64)
        })
        // `+Inf` reads as u64::MAX: the sum saturates rather than overflows.
        .fold(0, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::metric;

    const TEXT: &str = "\
# HELP conns_total Connections.
# TYPE conns_total counter
conns_total{direction=\"inbound\",reason=\"ok\"} 3
conns_total{direction=\"outbound\",reason=\"ok\"} 4
conns_total{direction=\"inbound\",reason=\"denied\"} 1
conns_total{source_direction=\"inbound\",direction=\"none\"} 50
conns_total_bytes{direction=\"inbound\"} 99
config_version 7
rss_bytes 1.5e3
";

    #[test]
    fn sums_the_series_that_carry_every_label() {
        assert_eq!(metric(TEXT, "conns_total", &[]), 58);
        assert_eq!(metric(TEXT, "conns_total", &[("direction", "inbound")]), 4);
        assert_eq!(
            metric(
                TEXT,
                "conns_total",
                &[("direction", "inbound"), ("reason", "denied")]
            ),
            1
        );
        assert_eq!(metric(TEXT, "conns_total", &[("direction", "sideways")]), 0);
        // `source_direction="inbound"` is not `direction="inbound"`.
        assert_eq!(metric(TEXT, "conns_total", &[("direction", "none")]), 50);
    }

    #[test]
    fn names_match_whole_and_values_parse_as_numbers() {
        assert_eq!(metric(TEXT, "config_version", &[]), 7);
        assert_eq!(metric(TEXT, "conns_total_bytes", &[]), 99);
        assert_eq!(metric(TEXT, "conns", &[]), 0);
        assert_eq!(metric(TEXT, "rss_bytes", &[]), 1500);
        assert_eq!(metric(TEXT, "absent", &[]), 0);
        assert_eq!(metric("", "conns_total", &[]), 0);
    }
}
