//! Expansion of `#[cluster::message]`.

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use quote::{quote, quote_spanned};
use syn::visit_mut::VisitMut;
use syn::{Error, Ident, Item};

use crate::args;
use crate::paths::Krate;

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let parsed: Item = match syn::parse2(item.clone()) {
        Ok(i) => i,
        Err(e) => {
            let e = e.to_compile_error();
            return quote!(#e #item);
        }
    };
    let (ident, generics) = match &parsed {
        Item::Enum(e) => (&e.ident, &e.generics),
        Item::Struct(s) => (&s.ident, &s.generics),
        other => {
            let e = Error::new_spanned(
                head(other),
                "`#[cluster::message]` goes on an `enum` or a `struct`; define the message as one",
            )
            .to_compile_error();
            return quote!(#e #item);
        }
    };
    match (args::parse_message(args), validate(generics)) {
        (Ok(krate), Ok(())) => generate(&Krate(krate), ident, &parsed),
        // Still derive, so the type's `#[serde(..)]` attributes and uses raise no errors of their
        // own; but not with a `crate` path that failed to parse.
        (Ok(krate), Err(e)) => {
            let e = e.to_compile_error();
            let derives = derives(&Krate(krate));
            quote!(#e #derives #parsed)
        }
        (Err(e), checked) => {
            let mut e = e;
            if let Err(more) = checked {
                e.combine(more);
            }
            let e = e.to_compile_error();
            quote!(#e #item)
        }
    }
}

/// Whether a struct or enum with these generics can be a message.
fn validate(generics: &syn::Generics) -> syn::Result<()> {
    if !generics.params.is_empty() {
        return Err(Error::new_spanned(
            generics,
            "a cluster message cannot be generic; define one concrete type per message",
        ));
    }
    if let Some(clause) = &generics.where_clause {
        return Err(Error::new_spanned(
            clause,
            "a cluster message cannot have a `where` clause; remove it",
        ));
    }
    Ok(())
}

/// The tokens of an item before its body, as `pub fn name(..) -> T` or `union U`: the span
/// of an error about the kind of item.
fn head(item: &Item) -> TokenStream {
    let mut out = TokenStream::new();
    let mut tokens = quote!(#item).into_iter().peekable();
    // Skip the outer attributes: `#` and its `[..]`.
    while matches!(tokens.peek(), Some(TokenTree::Punct(p)) if p.as_char() == '#') {
        tokens.next();
        tokens.next();
    }
    for tt in tokens {
        match &tt {
            TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => break,
            TokenTree::Punct(p) if p.as_char() == ';' || p.as_char() == '=' => break,
            _ => out.extend([tt]),
        }
    }
    out
}

// Input:  #[cluster::message] enum ToPrimary { Ping(u32) }
// Output: #[derive(Serialize, Deserialize)] #[serde(crate = "::cluster::__private::serde")]
//         enum ToPrimary { Ping(u32) }
//         impl ::cluster::__private::Message for ToPrimary { const FINGERPRINT: u64 = 0x..; }
fn generate(krate: &Krate, ident: &Ident, item: &Item) -> TokenStream {
    let fingerprint = fingerprint(item);
    let derives = derives(krate);
    let trait_path = krate.message_trait(ident.span());
    let impl_block = quote_spanned! {ident.span()=>
        impl #trait_path for #ident {
            const FINGERPRINT: ::core::primitive::u64 = #fingerprint;
        }
    };
    quote! {
        #derives
        #item
        #impl_block
    }
}

fn derives(krate: &Krate) -> TokenStream {
    let serde = krate.serde();
    let serde_str = krate.serde_string();
    quote! {
        #[derive(#serde::Serialize, #serde::Deserialize)]
        #[serde(crate = #serde_str)]
    }
}

/// FNV-1a of the definition without its doc comments: editing docs keeps workers compatible,
/// changing a field or variant does not.
fn fingerprint(item: &Item) -> u64 {
    struct StripDocs;
    impl VisitMut for StripDocs {
        fn visit_attributes_mut(&mut self, attrs: &mut Vec<syn::Attribute>) {
            attrs.retain(|a| !a.path().is_ident("doc"));
        }
    }
    let mut item = item.clone();
    StripDocs.visit_item_mut(&mut item);
    let text = quote!(#item).to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
