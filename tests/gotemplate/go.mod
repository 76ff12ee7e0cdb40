module lacd.test/gotemplate

go 1.19
