//! The start order of a stack's services: a topological sort of their dependencies.
//!
//! Pure: the caller decides where the dependencies come from (Compose v2's
//! `com.docker.compose.depends_on` labels, the stack's config or the compose file, see
//! [`OrderSource`]) and hands over the services and the edges. Stopping is the same order
//! reversed.

use std::collections::{BTreeMap, BTreeSet};

/// Where a stack's start order came from, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderSource {
    /// Compose v2's `com.docker.compose.depends_on` labels on the containers.
    Labels,
    /// The stack config's `depends_on` (Compose v1 writes no label).
    ConfigDependsOn,
    /// The stack config's `order` list.
    ConfigOrder,
    /// The compose file's `depends_on` (and `links`, `volumes_from`, `network_mode:
    /// service:…`), read by [`crate::compose_file`]: what Compose v1 orders by, though it keeps
    /// no label of it.
    ComposeFile,
    /// Nothing said anything: service names, alphabetically.
    Names,
}

/// The services of a `com.docker.compose.depends_on` label value.
///
/// Compose v2 writes `svc:condition:restart` entries joined by commas
/// (`db:service_healthy:false,cache:service_started:true`); versions before 2.17 wrote
/// `svc:condition`. Only the service name matters for the order; the condition is Compose's
/// business when it creates the stack.
pub fn parse_depends_on_label(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|entry| {
            let service = entry.split(':').next().unwrap_or("").trim();
            (!service.is_empty()).then(|| service.to_owned())
        })
        .collect()
}

/// A dependency cycle among the services, as a path that starts and ends with the same service
/// (`["a", "b", "a"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle(pub Vec<String>);

/// Sorts `services` so that every service comes after the services it depends on.
///
/// - `depends_on` maps a service to the services it needs started first. Dependencies on
///   services that are not in `services` are ignored (the stack has no container for them, so
///   there is nothing to wait for).
/// - Services that the dependencies leave free to go in any order go by their position in
///   `order` first (services not listed there after the listed ones), then by name, so the
///   result is deterministic and `order` alone is a complete answer.
pub fn start_order(
    services: &BTreeSet<String>,
    depends_on: &BTreeMap<String, Vec<String>>,
    order: &[String],
) -> Result<Vec<String>, Cycle> {
    let rank = |s: &str| {
        (
            order.iter().position(|o| o == s).unwrap_or(usize::MAX),
            s.to_owned(),
        )
    };
    // service -> its dependencies that are part of this stack.
    let deps: BTreeMap<&str, BTreeSet<&str>> = services
        .iter()
        .map(|s| {
            let d = depends_on
                .get(s)
                .into_iter()
                .flatten()
                .filter(|d| services.contains(*d) && *d != s)
                .map(String::as_str)
                .collect();
            (s.as_str(), d)
        })
        .collect();
    // A self-dependency is a cycle of one; filtered out above, so catch it here.
    if let Some(s) = services
        .iter()
        .find(|s| depends_on.get(*s).is_some_and(|d| d.contains(s)))
    {
        return Err(Cycle(vec![s.clone(), s.clone()]));
    }

    let mut waiting: BTreeMap<&str, usize> = deps.iter().map(|(s, d)| (*s, d.len())).collect();
    let mut ready: BTreeSet<(usize, String)> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(s, _)| rank(s))
        .collect();
    let mut sorted = Vec::with_capacity(services.len());
    while let Some((_, next)) = ready.pop_first() {
        waiting.remove(next.as_str());
        for (s, d) in &deps {
            if d.contains(next.as_str())
                && let Some(n) = waiting.get_mut(s)
            {
                *n -= 1;
                if *n == 0 {
                    ready.insert(rank(s));
                }
            }
        }
        sorted.push(next);
    }
    if waiting.is_empty() {
        return Ok(sorted);
    }
    Err(find_cycle(&deps, &waiting))
}

/// Every service left in `waiting` has a dependency left in `waiting`, so walking from any of
/// them must come back to a service already seen.
fn find_cycle(deps: &BTreeMap<&str, BTreeSet<&str>>, waiting: &BTreeMap<&str, usize>) -> Cycle {
    let mut path: Vec<&str> = Vec::new();
    let mut at = *waiting.keys().next().expect("called with services left");
    loop {
        if let Some(i) = path.iter().position(|p| *p == at) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| (*s).to_owned()).collect();
            cycle.push(at.to_owned());
            return Cycle(cycle);
        }
        path.push(at);
        at = deps[at]
            .iter()
            .copied()
            .find(|d| waiting.contains_key(d))
            .expect("a waiting service waits for another waiting service");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }
    fn deps(d: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        d.iter()
            .map(|(s, d)| ((*s).to_owned(), d.iter().map(|d| (*d).to_owned()).collect()))
            .collect()
    }
    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn dependencies_come_first_whatever_the_names() {
        let got = start_order(
            &set(&["app", "mid", "zdb"]),
            &deps(&[("app", &["mid"]), ("mid", &["zdb"])]),
            &[],
        );
        assert_eq!(got, Ok(strings(&["zdb", "mid", "app"])));
    }

    #[test]
    fn order_alone_is_the_order_and_unlisted_services_follow_by_name() {
        let got = start_order(
            &set(&["a", "b", "c", "d"]),
            &BTreeMap::new(),
            &strings(&["c", "a"]),
        );
        assert_eq!(got, Ok(strings(&["c", "a", "b", "d"])));
    }

    #[test]
    fn order_breaks_ties_but_never_beats_a_dependency() {
        let got = start_order(
            &set(&["app", "db", "cache"]),
            &deps(&[("app", &["db"])]),
            &strings(&["app", "cache", "db"]),
        );
        assert_eq!(got, Ok(strings(&["cache", "db", "app"])));
    }

    #[test]
    fn no_information_means_name_order() {
        let got = start_order(&set(&["b", "a", "c"]), &BTreeMap::new(), &[]);
        assert_eq!(got, Ok(strings(&["a", "b", "c"])));
    }

    #[test]
    fn dependencies_outside_the_stack_are_ignored() {
        let got = start_order(&set(&["app"]), &deps(&[("app", &["gone"])]), &[]);
        assert_eq!(got, Ok(strings(&["app"])));
    }

    #[test]
    fn a_cycle_is_named() {
        let got = start_order(
            &set(&["a", "b", "c", "free"]),
            &deps(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]),
            &[],
        );
        assert_eq!(got, Err(Cycle(strings(&["a", "b", "c", "a"]))));
        let got = start_order(&set(&["a"]), &deps(&[("a", &["a"])]), &[]);
        assert_eq!(got, Err(Cycle(strings(&["a", "a"]))));
    }

    #[test]
    fn compose_v2_labels_parse_in_both_formats() {
        assert_eq!(
            parse_depends_on_label("db:service_healthy:false,cache:service_started:true"),
            strings(&["db", "cache"])
        );
        assert_eq!(
            parse_depends_on_label("db:service_started"),
            strings(&["db"])
        );
        assert_eq!(parse_depends_on_label(""), Vec::<String>::new());
    }
}
