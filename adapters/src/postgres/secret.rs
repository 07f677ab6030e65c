//! Connection strings without their password, and a password added to one.
//!
//! A PostgreSQL connection string may carry a password (`password=…` in the libpq form,
//! `postgres://user:password@host/…` or `?password=…` in the URL form). Anything concord prints
//! — `Debug` of its configuration types, error messages, logs — shows the string through
//! [`redact_url`], which replaces every password with `***`; where the server is, concord says
//! with `host:port/dbname as user` instead, which has none. [`with_password`] adds a password
//! read from elsewhere (`password_file`, `password_env` in `concord.toml`) to a string that
//! has none, quoted or percent-encoded so that any character survives.
//!
//! # Implementation caveats
//!
//! * The redaction reads the string as libpq does; when it cannot (an unterminated quote, a
//!   parameter without `=`), everything from that point on is hidden.
//! * A password with a space that is not quoted (`password=a b`) is, for libpq too, a password
//!   `a` followed by another parameter, which is then shown.

/// What a password is replaced with.
const MASK: &str = "***";

/// `url` with every password replaced by `***` (both the libpq `key=value` form and the URL
/// form); the rest is unchanged.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", redact_uri_rest(rest)),
        None => redact_key_values(url),
    }
}

/// The part of a `postgres://` URL after the scheme, without the password of its user info nor
/// a `password` query parameter.
fn redact_uri_rest(rest: &str) -> String {
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let mut out = match before_query.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{MASK}@{hosts}"),
            None => before_query.to_string(),
        },
        None => before_query.to_string(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if is_password_key(key) => format!("{key}={MASK}"),
                _ => param.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Whether a parameter name is `password` (as written, or percent-encoded).
fn is_password_key(key: &str) -> bool {
    let key = key.trim();
    key == "password" || percent_decoded(key).as_deref() == Some("password")
}

/// `s` percent-decoded, when it is valid UTF-8 after decoding.
fn percent_decoded(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A libpq `key=value …` string with the value of every `password` replaced; from the first
/// thing it cannot read on, the rest is hidden.
fn redact_key_values(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    loop {
        let trimmed = rest.trim_start();
        out.push_str(&rest[..rest.len() - trimmed.len()]);
        if trimmed.is_empty() {
            return out;
        }
        let Some((key, value_len, after)) = parameter(trimmed) else {
            out.push_str(MASK);
            return out;
        };
        if key == "password" {
            out.push_str(&trimmed[..trimmed.len() - after.len() - value_len]);
            out.push_str(MASK);
        } else {
            out.push_str(&trimmed[..trimmed.len() - after.len()]);
        }
        rest = after;
    }
}

/// The parameter at the start of `s`: its key, the length of its value as written, and what
/// follows; `None` when it is malformed.
fn parameter(s: &str) -> Option<(&str, usize, &str)> {
    let key_end = s.find(|c: char| c.is_whitespace() || c == '=')?;
    let key = &s[..key_end];
    let after_key = s[key_end..].trim_start();
    let after_eq = after_key.strip_prefix('=')?.trim_start();
    let value_len = value_length(after_eq)?;
    Some((key, value_len, &after_eq[value_len..]))
}

/// The length of the value at the start of `s` (quoted with `'` or bare, `\` escaping the next
/// character); `None` when a quote is unterminated or the value empty.
fn value_length(s: &str) -> Option<usize> {
    let quoted = s.starts_with('\'');
    let mut chars = s.char_indices().skip(usize::from(quoted));
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '\'' if quoted => return Some(i + 1),
            c if c.is_whitespace() && !quoted => return (i > 0).then_some(i),
            _ => {}
        }
    }
    (!quoted && !s.is_empty()).then_some(s.len())
}

/// `url` (which sets no password) with `password` added: a quoted `password='…'` parameter in
/// the libpq form, a percent-encoded `password=` query parameter in the URL form.
pub fn with_password(url: &str, password: &str) -> String {
    if url.contains("://") {
        let separator = if url.contains('?') { '&' } else { '?' };
        return format!("{url}{separator}password={}", percent_encoded(password));
    }
    let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
    let separator = if url.trim().is_empty() { "" } else { " " };
    format!("{}{separator}password='{quoted}'", url.trim_end())
}

/// Every byte but ASCII letters and digits as `%XX`.
fn percent_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn passwords_are_masked_in_both_forms() {
        let cases = [
            (
                "host=h password=s3cret user=u",
                "host=h password=*** user=u",
            ),
            (
                "host=h password = 's3 cr\\'et' dbname=d",
                "host=h password = *** dbname=d",
            ),
            ("host=h password='s3cret", "host=h ***"),
            (
                "postgres://u:s3cret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            (
                "postgresql://u@h/db?password=s3cret&sslmode=disable",
                "postgresql://u@h/db?password=***&sslmode=disable",
            ),
            (
                "postgres://u@h/db?pass%77ord=s3cret",
                "postgres://u@h/db?pass%77ord=***",
            ),
            ("host=h user=u", "host=h user=u"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn an_added_password_reads_back_whatever_its_characters() {
        for password in ["plain", "with space", "qu'ote\\back", "a@b:c/d?e&f=g%"] {
            for url in [
                "host=h user=u",
                "postgres://u@h/db",
                "postgres://u@h/db?sslmode=disable",
            ] {
                let full = with_password(url, password);
                let parsed = tokio_postgres::Config::from_str(&full).unwrap();
                assert_eq!(parsed.get_password(), Some(password.as_bytes()), "{full}");
                assert!(!redact_url(&full).contains(password), "{full}");
            }
        }
    }
}
