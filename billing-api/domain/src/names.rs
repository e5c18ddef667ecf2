//! Status and kind fields as enums with one stored and answered name each.
//!
//! [`named!`](crate::named) declares such an enum once: serde and the
//! OpenAPI schema use the variant's snake_case name, `as_str` gives the
//! name written beside the variant (for SQL and metric labels; each enum's
//! test checks the two agree), `FromStr` reads it back (an unknown name is an
//! error naming what it is), and `ALL` lists every value for tests and
//! metrics. Comparing with a `&str` compares the name.

/// Declares a named enum: `named! { /// doc  pub enum X ("what") { A => "a", … } }`.
#[macro_export]
macro_rules! named {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize, utoipa::ToSchema,
        )]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored and answered name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!(concat!("unknown ", $what, " {:?}"), s))
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::named! {
        /// A test enum.
        pub enum Colour ("colour") {
            Red => "red",
            DarkBlue => "dark_blue",
        }
    }

    #[test]
    fn names_round_trip_through_text_and_json() {
        for c in Colour::ALL {
            assert_eq!(c.as_str().parse::<Colour>(), Ok(*c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
            assert_eq!(
                serde_json::from_value::<Colour>(serde_json::json!(c.as_str())).unwrap(),
                *c
            );
        }
        assert_eq!(Colour::DarkBlue.to_string(), "dark_blue");
        assert!(Colour::Red == "red");
        assert_eq!(
            "green".parse::<Colour>(),
            Err("unknown colour \"green\"".to_owned())
        );
    }
}
