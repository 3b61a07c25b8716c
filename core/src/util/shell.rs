//! Quoting for the rare places a shell line is unavoidable (ssh sends one string to the
//! remote shell): one word per argument, nothing interpolated.

/// Quote one word for a POSIX shell: the shell sees exactly `s`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}
