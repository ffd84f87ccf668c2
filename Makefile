# digime — PGXS build.  `make && make install`, then `make installcheck`
# against a running server that has the test settings (see test/run-tests.sh).
EXTENSION   = digime
EXTVERSION  = 1.0
MODULE_big  = digime
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
DATA        = digime--1.0.sql
PGFILEDESC  = "digime - digi.me user authorization from SQL"

PG_CPPFLAGS = -Isrc -DDIGIME_VERSION='"$(EXTVERSION)"'
SHLIB_LINK  = -lcurl -lcrypto

REGRESS      = setup contracts authorize_url callback errors security
REGRESS_OPTS = --inputdir=. --outputdir=test/results --load-extension=digime

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

EXTRA_CLEAN = test/results

# every object depends on the shared header (PGXS tracks no header dependencies)
$(OBJS): src/digime.h
