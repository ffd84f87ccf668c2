/*-------------------------------------------------------------------------
 *
 * crypt.h
 *	  Optional envelope encryption of secrets at rest (crypt.c).
 *
 * IDENTIFICATION
 *	  src/crypt.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_CRYPT_H
#define DIGIME_CRYPT_H

/* Loads the key files when preloading (in the postmaster). */
extern void dm_crypt_init(bool preloading);
extern bool dm_crypt_enabled(void);
/* Id of the loaded digime.key_file key, or NULL. */
extern const char *dm_crypt_key_id(void);
/* Value to store: AES-256-GCM ciphertext bound to aad, or the plaintext. */
extern char *dm_seal(const char *plain, const char *aad);
/* Plaintext of a stored value; raises if it cannot be decrypted. */
extern char *dm_open(const char *stored, const char *aad);
/* True when the stored value is sealed with the current key (or plain and no key). */
extern bool dm_sealed_current(const char *stored);
/* Wipes and frees a palloc'd secret (NULL is fine). */
extern void dm_secret_free(char *secret);

#endif							/* DIGIME_CRYPT_H */
